"""Reflow's training set: (noise, sample) pairs of a flow model (Liu et al. 2023), and their file.

`diffctl reflow` writes <run>/pairs.npz: float32 `noise` [N, C, H, W] (pair i's standard-normal draw 0
of diffctl.noise for (seed, i): the sampler's start is prior_std * noise), float32 `samples` of the same
shape (the ODE's end from that start, unclipped floats in the model's space, not uint8 images), and for
a class-conditional model int64 `labels` (sample i's class). `objective=reflow objective.pairs=<file>`
trains on it: attach_pairs makes it the run's training set, served as batches {image: sample,
noise: noise, class_label: label}.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch.utils.data import Dataset

from diffctl.conditioning import CLASS_LABEL, IMAGE
from diffctl.errors import ConfigError, DataError

NOISE = "noise"  # the batch key of a pair's noise
PAIRS_FILE = "pairs.npz"
PAIR_KEYS = ("noise", "samples")


class PairsDataset(Dataset):
    """Pairs as dict samples; labels only when the file has them."""

    def __init__(self, samples: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None = None):
        self.samples, self.noise, self.labels = samples, noise, labels

    def __len__(self) -> int:
        return len(self.samples)

    def _item(self, i) -> dict:
        item = {IMAGE: self.samples[i], NOISE: self.noise[i]}
        if self.labels is not None:
            item[CLASS_LABEL] = self.labels[i]
        return item

    def __getitem__(self, i: int) -> dict:
        return self._item(i)

    def __getitems__(self, indices: list[int]) -> list:  # one gather per batch, not one per sample
        idx = torch.as_tensor(indices)
        batch = self._item(idx)
        return [{k: v[j] for k, v in batch.items()} for j in range(len(indices))]


def read_pairs(path: str | Path, key: str = "objective.pairs") -> PairsDataset:
    """The pairs in `path`, checked: both arrays present, float, of one shape, finite; labels int, one per pair."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise DataError(f"{key}={path}: no such file (a pairs.npz written by `diffctl reflow`)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{key}={path} does not read as an .npz file ({err})") from None
    missing = [k for k in PAIR_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{key}={path} has no {' or '.join(missing)} array: not a pairs file of `diffctl reflow`")
    noise, samples = arrays["noise"], arrays["samples"]
    if noise.shape != samples.shape or noise.ndim != 4 or not all(a.dtype.kind == "f" for a in (noise, samples)):
        raise DataError(f"{key}={path}: noise and samples must be float arrays of one [N, C, H, W] shape, got "
                        f"{noise.dtype} {noise.shape} and {samples.dtype} {samples.shape}")  # fmt: skip
    if not (np.isfinite(noise).all() and np.isfinite(samples).all()):
        raise DataError(f"{key}={path} holds non-finite values; make the pairs again")
    labels = arrays.get("labels")
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (len(noise),)):
        raise DataError(f"{key}={path}: labels must be {len(noise)} integers, got {labels.dtype} {labels.shape}")
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return PairsDataset(as_tensor(samples), as_tensor(noise), None if labels is None else torch.from_numpy(labels.astype(np.int64)))


def uses_pairs(cfg: DictConfig) -> bool:
    target = (cfg.get("objective") or {}).get("_target_")
    return bool(target) and getattr(get_class(target), "uses_pairs", False)


def attach_pairs(cfg: DictConfig, datamodule, shape: dict) -> None:
    """For objective=reflow: objective.pairs becomes the datamodule's training set, checked against the
    run (the model's shape and classes, no flips, no first stage, no image condition)."""
    if not uses_pairs(cfg):
        return
    if not cfg.objective.get("pairs"):
        raise ConfigError("objective=reflow trains on pairs: set objective.pairs to the pairs.npz of a `diffctl reflow` run")
    if cfg.get("first_stage") or (cfg.get("condition") or {}).get("name", "none") != "none":
        raise ConfigError("objective=reflow supports pixel-space models without an image condition (a latent or image-to-image "
                          "model's pairs would need its latents or source images)")  # fmt: skip
    if cfg.data.get("random_flip"):
        raise ConfigError("objective=reflow needs data.random_flip=false: a flipped sample is not the end of its noise's path")
    pairs = read_pairs(cfg.objective.pairs)
    want = (shape["channels"], shape["resolution"], shape["resolution"])
    if tuple(pairs.samples.shape[1:]) != want:
        raise ConfigError(f"objective.pairs holds {'x'.join(map(str, pairs.samples.shape[1:]))} pairs; this model makes "
                          f"{'x'.join(map(str, want))}: use the pairs of this model's `diffctl reflow` run")  # fmt: skip
    if shape["num_classes"] and pairs.labels is None:
        raise ConfigError("objective.pairs has no labels, but the model is class-conditional: make the pairs with this model")
    datamodule.set_dataset("train", pairs)


def pairs_batch_maker(cfg: DictConfig, source, sampling, device: torch.device) -> Callable[[int, int], dict]:
    """make(first, n) for diffctl.indexjob.run_job: pairs first..first+n-1 as float32 CPU tensors. The
    noise is draw 0 of diffctl.noise for (seed, i), the draw diffctl.samplers.generate starts from."""
    from diffctl.conditioning import class_labels
    from diffctl.generation import sample_cond
    from diffctl.noise import sample_noise
    from diffctl.samplers import generate

    def make(first: int, n: int) -> dict[str, torch.Tensor]:
        cond = sample_cond(cfg, sampling.model, first, n, device)
        noise = sample_noise(cfg.seed, range(first, first + n), device, cfg.noise).randn(source.shape, device=device)
        before = sampling.calls[0]
        with sampling.autocast(device):
            x = generate(sampling.model, n, source.shape, cfg.sampler, cfg.steps, cfg.seed, cond, device, first, cfg.noise)
        batch = {"samples": x.float().cpu(), "noise": noise.float().cpu(), "calls": torch.tensor(sampling.calls[0] - before)}
        y = class_labels(cond)
        if y is not None:
            batch["labels"] = y.cpu()
        return batch

    return make
