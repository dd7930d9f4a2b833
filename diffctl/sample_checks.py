"""`diffctl sample`'s checks of its options, before any work: those that need no checkpoint, then
those against the model that was loaded."""

from __future__ import annotations

from omegaconf import DictConfig

from diffctl.errors import ConfigError
from diffctl.generation import guided_model
from diffctl.image_conditions import SOURCE
from diffctl.img2img_job import check_source_model
from diffctl.networks.gmm import is_mixture
from diffctl.samplers import check_fits as sampler_fits
from diffctl.samplers import check_sampler
from diffctl.source import Source


def check_options(cfg: DictConfig) -> None:
    """Checks that need no checkpoint: done before loading anything. Types and ranges are the schema's
    (diffctl/schema/keys.py), checked again here on the config a resume= run continues with."""
    from diffctl.schema import validate

    validate(cfg, "sample", where=f"in {cfg.resume}/.hydra/config.yaml" if cfg.get("resume") else None)
    devices = cfg.trainer.devices
    if devices > cfg.num_samples:
        raise ConfigError(f"trainer.devices={devices} is more than num_samples={cfg.num_samples}; use fewer devices")
    check_sampler(cfg.sampler)  # the combinations of options the schema cannot express
    model = cfg.get("model")
    if model is not None and not is_mixture(model):
        raise ConfigError(
            "sample takes a trained network from its checkpoint (ckpt=...); model= only selects the analytic model=gmm, "
            "which needs no checkpoint"
        )
    if model is None and cfg.get("sde") is not None:
        raise ConfigError("sde= applies to model=gmm only; a checkpoint is sampled with the SDE it was trained with")
    if model is not None and cfg.ckpt:
        raise ConfigError("model=gmm is the analytic model and needs no checkpoint; drop ckpt= (or model=gmm)")
    if not cfg.get("classifier") and float(cfg.get("classifier_scale", 1.0)) != 1.0:
        raise ConfigError("classifier_scale applies to classifier guidance only; give classifier=<train-classifier run> "
                          "(or classifier=exact for model=gmm), or drop classifier_scale")  # fmt: skip
    if model is not None and cfg.clip_denoised:
        raise ConfigError("clip_denoised clips to the image range [-1, 1]; model=gmm data is unbounded, use clip_denoised=null or false")


def check_fits(cfg: DictConfig, source: Source) -> None:
    """Checks of the sampler options against the checkpoint."""
    can = source.denoiser.capabilities
    sampler_fits(cfg.sampler.name, can)  # what the sampler needs of the model (its registration)
    check_source_model(cfg, source)  # source= given exactly for image-to-image models
    if SOURCE in can.conditions:  # guided by its source (classifier-free: its null source), no classes
        return
    num_classes = can.num_classes
    if float(cfg.guidance) != 1.0:
        if num_classes == 0:
            raise ConfigError(
                "guidance needs a class-conditional model (train with conditional=true, or model.conditional=true for model=gmm); "
                f"{source.description} is unconditional"
            )
        if not can.null_condition:
            raise ConfigError(
                "guidance needs a checkpoint trained with label_dropout > 0 (its null class was never trained); "
                "use guidance=1 or retrain with e.g. label_dropout=0.1"
            )
    # the model as sampled: a classifier guides an unconditional model over its own classes
    guided = guided_model(cfg, source).capabilities
    if cfg.class_label is not None:
        if guided.num_classes == 0:
            raise ConfigError(f"class_label was given, but {source.description} is unconditional "
                              "(classifier=<train-classifier run> guides it towards a class)")  # fmt: skip
        if not 0 <= int(cfg.class_label) < guided.num_classes:
            raise ConfigError(f"class_label must be in [0, {guided.num_classes - 1}], got {cfg.class_label}")
