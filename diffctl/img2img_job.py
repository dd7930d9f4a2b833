"""`diffctl sample source=...`: an image-to-image checkpoint (`diffctl train condition=sr|colorize|
inpaint`, diffctl/image_conditions.py) makes one output per source image. diffctl/sample.py runs it
as any sample run (shards, batches, processes, resume); this module holds what differs: the checks,
the sources read before any work, and the batch of images first..first+n-1.

What source= holds is told by the images' size (images are never resized, as diffctl/image_sources.py):
- images of the model's own size (a <dataset>:<split> is read at it, as in training) are TARGETS:
  the sources are made from them by the checkpoint's condition (sr: downsampled and upsampled back,
  colorize: their luma, inpaint: a Palette-like mask per image, mask i = random_mask(H, W, seed, i)),
  and the outputs are scored against them;
- sr: images of resolution/factor are low-resolution SOURCES; colorize: 1-channel images at full
  resolution are gray SOURCES. There is no target then, only the consistency error of sr.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from diffctl.errors import ConfigError
from diffctl.generation import SamplingModel
from diffctl.image_conditions import SOURCE
from diffctl.image_sources import read_images
from diffctl.images import to_uint8
from diffctl.lpips import LPIPS, from_config as lpips_from_config
from diffctl.references import InMemory
from diffctl.samplers import generate
from diffctl.source import Source


@dataclass
class Sources:
    cond: Tensor  # cond[SOURCE] of every image, float32 [N, extra_channels, H, W]
    shown: Tensor  # the sources as images with the data's channels [N, C, H, W] in [-1, 1] (conditioner.shown)
    targets: Tensor | None  # [N, C, H, W] in [-1, 1], when source= holds targets
    given: Tensor | None  # the sources as given (sr: low-resolution [N, C, H/f, W/f]), for the consistency error
    kind: str  # "targets" or "sources": what source= holds
    lpips: LPIPS | None = None  # loaded (its file checked) before any work; None: no LPIPS

    def __len__(self) -> int:
        return self.cond.shape[0]


def _size(shape) -> str:
    c, h, w = shape
    return f"{w}x{h} {c}-channel"


def check_source_model(cfg: DictConfig, source: Source) -> None:
    """source= against the checkpoint, before anything is read (ConfigError, one line)."""
    can = source.denoiser.capabilities
    if SOURCE not in can.conditions:
        if cfg.get("source") is not None:
            raise ConfigError(f"source= applies to image-to-image checkpoints (trained with condition=sr|colorize|inpaint); "
                              f"{source.description} makes images from noise alone: drop source=")  # fmt: skip
        return
    name = source.denoiser.conditioner.name
    if cfg.get("source") is None:
        raise ConfigError(f"ckpt={source.description} is an image-to-image model (condition={name}): "
                          "give source=<dataset:split | folder | .npz>")  # fmt: skip
    if cfg.get("classifier"):
        raise ConfigError("classifier= guides towards a class; an image-to-image model is guided by its source: drop classifier=")
    if float(cfg.guidance) != 1.0 and not can.null_condition:
        raise ConfigError("guidance needs an image-to-image checkpoint trained with condition.dropout > 0 (its null source "
                          "was never trained); use guidance=1 or retrain with e.g. condition.dropout=0.1")  # fmt: skip
    if cfg.class_label is not None:
        raise ConfigError(f"class_label applies to class-conditional models; {source.description} is conditioned on source images")


def _read(cfg: DictConfig, source: Source):
    """The images of source=: a <dataset>:<split> at the model's size, a folder or .npz as stored."""
    c, h, _ = source.shape
    spec = str(cfg.source)
    path = Path(spec).expanduser()
    stored = path.exists() or spec.endswith(".npz")
    return read_images(spec, root=cfg.get("source_root"), resolution=None if stored else h, channels=None if stored else c,
                       limit=cfg.num_samples).images  # fmt: skip


def read_sources(cfg: DictConfig, source: Source) -> Sources:
    """Every check that can fail and every source image, before any process is started."""
    conditioner = source.denoiser.conditioner
    full, given = tuple(source.shape), conditioner.given_shape()
    images = _read(cfg, source)
    shape = tuple(images.shape[1:])
    if shape == full:
        kind, targets, cond = "targets", images, conditioner.sources(images, 0, cfg.seed)
    elif shape == given:
        kind, targets, cond = "sources", None, conditioner.from_given(images)
    else:
        also = f", or {_size(given)} images (the sources themselves)" if given else ""
        raise ConfigError(f"source={cfg.source} has {_size(shape)} images; {source.description} (condition={conditioner.name}) "
                          f"takes {_size(full)} images (the targets, its source is made from them){also}")  # fmt: skip
    if cfg.trainer.devices > len(images):
        raise ConfigError(f"trainer.devices={cfg.trainer.devices} is more than the {len(images)} images of source={cfg.source}; use fewer devices")
    given = images if targets is None else conditioner.given(images)
    cond = cond.float()
    return Sources(cond, conditioner.shown({SOURCE: cond}), targets, given, kind, lpips_from_config(cfg, *full[1:]))


def source_batch_maker(cfg: DictConfig, source: Source, sources: Sources, sampling: SamplingModel, device) -> Callable[[int, int], dict]:
    """make(first, n) for diffctl.indexjob.run_job: outputs first..first+n-1 as uint8 NHWC and the
    network calls they took; output i's noise from (seed, i) as `diffctl sample`'s, its cond its source."""

    def make(first: int, n: int) -> dict[str, torch.Tensor]:
        cond = {SOURCE: sources.cond[first : first + n].to(device)}
        before = sampling.calls[0]
        with sampling.autocast(device):
            x = generate(sampling.model, n, source.shape, cfg.sampler, cfg.steps, cfg.seed, cond, device, first, cfg.noise)
        return {"samples": to_uint8(x), "calls": torch.tensor(sampling.calls[0] - before, dtype=torch.int64)}

    return make


def targets_reference(cfg: DictConfig, sources: Sources) -> InMemory | None:
    """The reference of FID/KID: the targets of source= (SR3's and Palette's FID of outputs against
    the ground truth, the same images), unless metrics.ref names another set or there are no targets
    (then metrics.ref as for any sample run: null = the training data)."""
    if sources.targets is None or cfg.metrics.get("ref") is not None:
        return None
    return InMemory(f"the {len(sources)} targets of source={cfg.source}", sources.targets)
