"""`diffctl sample`'s generation: the model as the sampler sees it (speed switches, precision,
guidance, clipping, a count of network calls; `diffctl inpaint` uses it too), the batch of samples
first..first+n-1 in the form diffctl.indexjob stores it, and what a finished shard of such a run must hold."""

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
from diffctl.guidance import ClassifierGuided
from diffctl.images import to_uint8
from diffctl.performance import sampling_autocast, speed_up, use_channels_last
from diffctl.resume import resume_config
from diffctl.resume_check import check_shards
from diffctl.samplers import generate
from diffctl.source import Source

# What a shard must hold to be used; "labels" too for a class-conditional model, "classifier_calls"
# with classifier guidance (shard_keys).
SHARD_KEYS = ("samples", "calls")


def shard_keys(cfg: DictConfig) -> tuple[str, ...]:
    return (*SHARD_KEYS, "classifier_calls") if cfg.get("classifier") else SHARD_KEYS


def batch_dependent(sampler) -> bool:
    """Whether a sample depends on the others of its batch (a step size or noise scale chosen for
    the whole batch): then batch_size and trainer.devices change the samples."""
    return (sampler.name == "ode" and sampler.get("solver") == "adaptive") or (
        sampler.name == "pc" and sampler.get("corrector") == "langevin"
    )


def sample_resume_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """`diffctl sample resume=`: the interrupted run's config and directory (diffctl.resume.resume_config)."""
    return resume_config(cfg, "sample", lambda stored: batch_dependent(stored.sampler))


def sample_cond(cfg: DictConfig, model, first: int, n: int, device) -> dict:
    """The cond of samples first..first+n-1 for `model` (guided_model's): sample i gets class_label,
    or class i mod num_classes (balanced) when class_label is null (the model's conditioner decides;
    with a classifier on an unconditional model, the classifier's classes)."""
    return model.conditioner.for_samples(first, n, device, cfg.class_label)


def clips(cfg: DictConfig, can) -> bool:
    """Whether x0 predictions are clipped: clip_denoised, or when null, for bounded (image) data only."""
    return bool(cfg.clip_denoised) or (cfg.clip_denoised is None and can.data_range is not None)


def guided_model(cfg: DictConfig, source: Source, denoiser=None):
    """What the sampler calls: the denoiser (default the source's), with classifier-free guidance
    (none without a `guidance` key, as inpaint's), clipping and classifier guidance as cfg asks, in
    that order. The classifier tilts the clipped prediction, as guided-diffusion's
    condition_score/condition_mean act on the clipped x0.
    ConfigError when the classifier cannot guide this model (diffctl.guidance.check_classifier)."""
    model = denoiser if denoiser is not None else source.denoiser
    can = model.capabilities
    guidance = float(cfg.get("guidance", 1.0))
    if guidance != 1.0:
        model = GuidedModel(model, guidance)
    if clips(cfg, can):
        model = ClippedModel(model, *(can.data_range or (-1.0, 1.0)))
    if source.classifier is not None:
        model = ClassifierGuided(model, source.classifier, cfg.classifier_scale)
    return model


@dataclass
class SamplingModel:
    model: Any  # what the sampler calls: guided_model's
    channels_last: bool
    calls: list[int]  # network calls so far (a forward hook counts them)
    clipped: bool
    precision: str = "32-true"  # the network's arithmetic (cfg.precision), applied by autocast()
    compile: bool = False  # cfg.compile: torch.compile the network (model=gmm has none; recorded as asked)

    def autocast(self, device: torch.device):
        """The context every batch runs in: the network at `precision`, the sampler's own updates in float32."""
        return sampling_autocast(self.precision, device)

    @property
    def classifier_calls(self) -> int:
        """Classifier evaluations so far (each a batched forward and backward); 0 without a classifier."""
        return getattr(self.model, "classifier_calls", 0)


def sampling_model(cfg: DictConfig, source: Source, device: torch.device) -> SamplingModel:
    """The source's denoiser on `device` with the speed switches (channels_last, compile, precision;
    absent keys: off, 32-true), guidance and clipping of cfg."""
    denoiser = source.denoiser.to(device)
    if source.codec is not None:  # the decoder runs on every batch, beside the denoiser
        source.codec.to(device)
    can = denoiser.capabilities
    channels_last = denoiser.backbone is not None and use_channels_last(cfg.get("channels_last", False), device.type)
    if denoiser.backbone is not None:  # the analytic model has no network to speed up
        speed_up(denoiser.backbone, channels_last, cfg.get("compile", False))
    calls = [0]
    denoiser.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return SamplingModel(guided_model(cfg, source, denoiser).to(device), channels_last, calls, clips(cfg, can),
                         str(cfg.get("precision", "32-true")), cfg.get("compile", False))  # fmt: skip


def batch_maker(cfg: DictConfig, source: Source, sampling: SamplingModel, device: torch.device) -> Callable[[int, int], dict]:
    """make(first, n) for diffctl.indexjob.run_job: samples first..first+n-1 as uint8 NHWC images
    (model=gmm: its raw float samples), their class labels and the network calls they took."""
    data_range = source.denoiser.capabilities.data_range

    def make(first: int, n: int) -> dict[str, torch.Tensor]:
        cond = sample_cond(cfg, sampling.model, first, n, device)
        y = class_labels(cond)
        before, classifier_before = sampling.calls[0], sampling.classifier_calls
        with sampling.autocast(device):
            x = generate(sampling.model, n, source.shape, cfg.sampler, cfg.steps, cfg.seed, cond, device, first, cfg.noise)
        if source.codec is not None:  # latent diffusion: the images are the first stage's decoding of the latents
            x = to_uint8(source.codec.decode(x.float()))
        else:
            x = to_uint8(x) if data_range is not None else x.float().cpu()  # unbounded (model=gmm): raw floats
        batch = {"samples": x, "calls": torch.tensor(sampling.calls[0] - before, dtype=torch.int64)}
        if source.classifier is not None:
            batch["classifier_calls"] = torch.tensor(sampling.classifier_calls - classifier_before, dtype=torch.int64)
        if y is not None:
            batch["labels"] = y.cpu()
        return batch

    return make


def check_resume_shards(cfg: DictConfig, source: Source, partial: Path) -> int:
    """check_shards with what this run's shards hold: uint8 HWC images (model=gmm: float32 samples)
    and the labels sample_cond gives; returns the number of finished samples."""
    if source.denoiser.capabilities.data_range is not None or source.codec is not None:
        image = source.image_shape
        shape, dtype = (*image[1:], image[0]), np.uint8
    else:
        shape, dtype = tuple(source.mixture.shape), np.float32
    labels, model = None, guided_model(cfg, source)
    if model.capabilities.num_classes > 0:
        labels = lambda first, n: class_labels(sample_cond(cfg, model, first, n, "cpu")).numpy()  # noqa: E731
    return check_shards(partial, cfg.num_samples, shape, dtype, labels)
