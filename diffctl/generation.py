"""`diffctl sample`'s generation: the model as the sampler sees it (speed switches, guidance,
clipping, a count of network calls), the batch of samples first..first+n-1 in the form
diffctl.indexjob stores it, and what a finished shard of such a run must hold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from diffctl.conditioning import class_labels
from diffctl.denoiser import ClippedModel, GuidedModel
from diffctl.images import to_uint8
from diffctl.performance import sampling_autocast, speed_up, use_channels_last
from diffctl.resume import resume_config
from diffctl.resume_check import check_shards
from diffctl.samplers import generate
from diffctl.source import Source

# What a shard must hold to be used; "labels" too for a class-conditional model.
SHARD_KEYS = ("samples", "calls")


def batch_dependent(sampler) -> bool:
    """Whether a sample depends on the others of its batch (a step size or noise scale chosen for
    the whole batch): then batch_size and trainer.devices change the samples."""
    return (sampler.name == "ode" and sampler.get("solver") == "adaptive") or (
        sampler.name == "pc" and sampler.get("corrector") == "langevin"
    )


def sample_resume_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """`diffctl sample resume=`: the interrupted run's config and directory (diffctl.resume.resume_config)."""
    return resume_config(cfg, "sample", lambda stored: batch_dependent(stored.sampler))


def sample_cond(cfg: DictConfig, source: Source, first: int, n: int, device) -> dict:
    """The cond of samples first..first+n-1: sample i gets class_label, or class i mod num_classes
    (balanced) when class_label is null (the model's conditioner decides)."""
    return source.denoiser.conditioner.for_samples(first, n, device, cfg.class_label)


@dataclass
class SamplingModel:
    model: Any  # what the sampler calls: the denoiser, guided and/or clipped
    channels_last: bool
    calls: list[int]  # network calls so far (a forward hook counts them)

    @property
    def clipped(self) -> bool:
        return isinstance(self.model, ClippedModel)


def sampling_model(cfg: DictConfig, source: Source, device: torch.device) -> SamplingModel:
    """The source's denoiser on `device` with the speed switches, guidance and clipping of cfg."""
    denoiser = source.denoiser.to(device)
    can = denoiser.capabilities
    channels_last = denoiser.backbone is not None and use_channels_last(cfg.get("channels_last", False), device.type)
    if denoiser.backbone is not None:  # the analytic model has no network to speed up
        speed_up(denoiser.backbone, channels_last, cfg.get("compile", False))
    calls = [0]
    denoiser.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    model = GuidedModel(denoiser, cfg.guidance) if float(cfg.guidance) != 1.0 else denoiser
    if cfg.clip_denoised or (cfg.clip_denoised is None and can.data_range is not None):  # null: clip bounded data only
        model = ClippedModel(model, *(can.data_range or (-1.0, 1.0)))
    return SamplingModel(model, channels_last, calls)


def batch_maker(cfg: DictConfig, source: Source, sampling: SamplingModel, device: torch.device) -> Callable[[int, int], dict]:
    """make(first, n) for diffctl.indexjob.run_job: samples first..first+n-1 as uint8 NHWC images
    (model=gmm: its raw float samples), their class labels and the network calls they took."""
    data_range = source.denoiser.capabilities.data_range

    def make(first: int, n: int) -> dict[str, torch.Tensor]:
        cond = sample_cond(cfg, source, first, n, device)
        y = class_labels(cond)
        before = sampling.calls[0]
        with sampling_autocast(cfg.get("precision", "32-true"), device):
            x = generate(sampling.model, n, source.shape, cfg.sampler, cfg.steps, cfg.seed, cond, device, first, cfg.noise)
        x = to_uint8(x) if data_range is not None else x.float().cpu()  # unbounded (model=gmm): raw floats
        batch = {"samples": x, "calls": torch.tensor(sampling.calls[0] - before, dtype=torch.int64)}
        if y is not None:
            batch["labels"] = y.cpu()
        return batch

    return make


def check_resume_shards(cfg: DictConfig, source: Source, partial: Path) -> int:
    """check_shards with what this run's shards hold: uint8 HWC images (model=gmm: float32 samples)
    and the labels sample_cond gives; returns the number of finished samples."""
    if source.denoiser.capabilities.data_range is not None:
        shape, dtype = (*source.shape[1:], source.shape[0]), np.uint8
    else:
        shape, dtype = tuple(source.mixture.shape), np.float32
    labels = None
    if source.denoiser.capabilities.num_classes > 0:
        labels = lambda first, n: class_labels(sample_cond(cfg, source, first, n, "cpu")).numpy()  # noqa: E731
    return check_shards(partial, cfg.num_samples, shape, dtype, labels)
