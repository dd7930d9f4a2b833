"""`diffctl train first_stage=...`: latent diffusion's set-up before training starts.

The first stage (an autoencoder run or a diffusers AutoencoderKL folder) is loaded and checked against
the data, the training set encoded once into the latent cache (diffctl/latents.py; reused when the same
weights, dataset and flips made it before), the latent scale estimated from that cache (LDM's 1 / std),
and the data module's training set replaced by the cached posteriors. The network then models latents
of shape [Cz, H/f, W/f]: that is the run's data_shape, and the decoded image shape follows from the
autoencoder (LatentCodec.image_shape)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from diffctl.console import JobProgress
from diffctl.errors import ConfigError
from diffctl.first_stage import load_first_stage
from diffctl.latent_codec import LatentCodec, codec_from_checkpoint
from diffctl.latents import LatentDataset, build_cache, cache_key, check_cache, expected_meta, latent_moments, weights_hash

IMAGE_CONDITIONS = ("sr", "colorize", "inpaint")


def uses_first_stage(cfg: DictConfig) -> bool:
    return bool(cfg.get("first_stage"))


def _check(cfg: DictConfig) -> None:
    condition = (cfg.get("condition") or {}).get("name", "none")
    if condition in IMAGE_CONDITIONS:
        raise ConfigError(f"first_stage= with condition={condition} is not supported: image-to-image models condition on "
                          "pixels; train them without a first stage")  # fmt: skip
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if strategy.startswith("fsdp"):
        raise ConfigError("first_stage= trains with one process or DDP, not trainer.strategy=fsdp "
                          "(diffctl's FSDP wraps the denoiser only); use trainer=ddp")  # fmt: skip


def _dataset_identity(datamodule) -> dict:
    """What the cached training set is: enough to tell another dataset (or a different limit) apart."""
    root = datamodule.root
    return {"name": datamodule.name, "root": str(Path(root).expanduser().resolve()) if root else None, "split": "train",
            "resolution": datamodule.resolution, "channels": datamodule.channels, "limit": datamodule.limit}  # fmt: skip


def resumed_codec(cfg: DictConfig, ckpt_path) -> LatentCodec | None:
    """A resumed latent run's first stage, from its checkpoint (so the run goes on with exactly those
    weights even if the folder first_stage= named has moved or changed); None otherwise."""
    if ckpt_path is None or not uses_first_stage(cfg):
        return None
    from diffctl.checkpoint import checkpoint_config, load_checkpoint

    ckpt = load_checkpoint(ckpt_path, "resume")
    return codec_from_checkpoint(ckpt, checkpoint_config(ckpt, ckpt_path), ckpt_path)


def load_codec(cfg: DictConfig, datamodule, shape: dict, stored: LatentCodec | None = None) -> tuple[LatentCodec, dict]:
    """The codec of cfg.first_stage (`stored`: a resumed run's, from its checkpoint) checked against the data,
    and the network's data shape: `shape` ({channels, resolution, num_classes} of the images) with the
    latents' channels and resolution. Cheap: nothing is encoded yet (encode_training_set does that)."""
    _check(cfg)
    autoencoder = stored.autoencoder if stored is not None else load_first_stage(cfg.first_stage, "first_stage")
    image = (datamodule.channels, datamodule.resolution, datamodule.resolution)
    try:
        latent_shape = autoencoder.latent_shape(*image)
    except ConfigError as err:
        raise ConfigError(f"first_stage={cfg.first_stage} does not fit data={cfg.data.name}: {err}") from None
    if latent_shape[1] != latent_shape[2]:
        raise ConfigError(f"first_stage latents are {latent_shape[1]}x{latent_shape[2]}; diffctl's networks take square inputs")
    return LatentCodec(autoencoder), {**shape, "channels": latent_shape[0], "resolution": latent_shape[1]}


def encode_training_set(cfg: DictConfig, datamodule, codec: LatentCodec, device: torch.device | str = "cpu") -> Path:
    """Encode the training set into the latent cache (or check the cache made before), put its posteriors
    in place of `datamodule`'s training images, and fill in cfg.latent.scale/shift where null (estimated
    from the cache) and cfg.latent.weights (the first stage's hash); returns the cache directory."""
    autoencoder = codec.autoencoder
    digest = weights_hash(autoencoder)
    stored = cfg.latent.get("weights")
    if stored and stored != digest:  # resume= with a first stage whose weights changed since
        raise ConfigError(f"first_stage={cfg.first_stage} holds other weights than the run was trained with "
                          f"(sha256 {digest[:12]}, the run's {stored[:12]}); give the autoencoder the run was trained with")  # fmt: skip
    flips = bool(cfg.data.get("random_flip", False))
    latent_shape = codec.latent_shape((datamodule.channels, datamodule.resolution, datamodule.resolution))
    meta = expected_meta(digest, _dataset_identity(datamodule), flips, latent_shape)
    directory = Path(str(cfg.latent.cache_dir)).expanduser() / cache_key(meta)
    if directory.exists():
        check_cache(directory, meta)
        print(f"Latent cache: {directory} (reused)")
    else:
        data = datamodule.dataset("train")
        codec.to(device)
        try:
            with JobProgress(bool(cfg.progress_bar)) as bar:
                task = bar.add_task(f"encoding the training set (f={codec.factor}{', and its mirror images' if flips else ''})",
                                    total=len(data))  # fmt: skip
                done = [0]

                def advance(n: int) -> None:
                    bar.advance(task, n - done[0])
                    done[0] = n

                # Forked: the DataLoader draws its seed from the global stream, which must leave the network's
                # initialisation the same whether the cache is built now or was built before (or by rank 0).
                with torch.random.fork_rng(devices=[]):
                    build_cache(lambda x: codec.posterior(x.to(device)), data, directory, meta, int(cfg.latent.batch_size),
                                flips, advance)
        finally:
            codec.cpu()
        print(f"Latent cache: {directory}")
    mean, std = latent_moments(directory)
    with open_dict(cfg):
        if cfg.latent.get("shift") is None:
            cfg.latent.shift = mean
        if cfg.latent.get("scale") is None:
            if std <= 0:
                raise ConfigError(f"the latents of first_stage={cfg.first_stage} have zero variance on this data; set latent.scale")
            cfg.latent.scale = 1.0 / std
        cfg.latent.weights = digest
    codec.scale, codec.shift = float(cfg.latent.scale), float(cfg.latent.shift)
    datamodule.set_dataset("train", LatentDataset(directory))
    return directory
