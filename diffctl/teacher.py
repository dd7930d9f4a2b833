"""A distillation's teacher (consistency distillation, progressive distillation): loaded for a
`diffctl train` run and checked against it (same SDE, a probability-flow ODE, the same data shape and,
for latent models, the same first stage), the student's optional start from its weights, and, for
objectives whose student is the teacher's own model (progressive), that model's config."""

from __future__ import annotations

from omegaconf import DictConfig

from hydra.utils import get_class
from omegaconf import open_dict

from diffctl.build import check_stored_targets, load_denoiser, same_sde, state_mismatch
from diffctl.checkpoint import checkpoint_config, load_checkpoint, resolve_checkpoint
from diffctl.errors import ConfigError
from diffctl.schema import validate

# What a student whose model is its teacher's (objective.model_from_teacher) takes from the teacher's
# config: the network, the SDE, the parameterization and the conditioning. The data is the run's own
# (checked to have the teacher's shape); the optimizer, EMA and trainer are the run's.
TEACHER_MODEL_KEYS = ("model", "sde", "denoiser", "conditional", "label_dropout", "condition", "first_stage", "latent")


def _first_stage(cfg) -> str | None:
    """The first stage's weights hash of a run config; None in pixel space."""
    return (cfg.get("latent") or {}).get("weights") if cfg.get("first_stage") else None


def adopt_teacher_model(cfg: DictConfig) -> str | None:
    """For an objective whose student is its teacher's model (progressive distillation), copy
    TEACHER_MODEL_KEYS from the teacher's checkpoint config into `cfg` (before anything is built) and
    check the result. Returns the teacher's path, or None for other objectives and for a resumed run,
    whose checkpoint already holds them."""
    if cfg.get("resume") or not getattr(get_class(cfg.objective._target_), "model_from_teacher", False):
        return None
    if not cfg.objective.get("teacher"):
        name = cfg.objective._target_.rsplit(".", 1)[-1].removesuffix("Objective").lower()
        raise ConfigError(f"objective={name} needs objective.teacher: the checkpoint or run directory of the diffusion model it starts from")
    path = resolve_checkpoint(cfg.objective.teacher, "objective.teacher")
    stored = checkpoint_config(load_checkpoint(path, "objective.teacher"), path)
    check_stored_targets(stored, path)
    with open_dict(cfg):
        for key in TEACHER_MODEL_KEYS:
            if key in stored:
                cfg[key] = stored[key]
    validate(cfg, "train", where=f"in the config of {path}, which objective.teacher takes the model from")
    return str(path)


def attach_teacher(cfg: DictConfig, objective, sde, shape: dict) -> None:
    """objective.teacher = the checkpoint objective.teacher_path names (nothing for other objectives)."""
    if not getattr(objective, "teacher_path", None):
        return
    teacher, teacher_cfg = load_denoiser(objective.teacher_path, use_ema=True, key="objective.teacher")
    if not same_sde(teacher.sde, sde):
        raise ConfigError(
            f"distillation needs the teacher's SDE: teacher has {teacher.sde}, this run has {sde}; "
            f"set sde={teacher.sde.name} with the same parameters"
        )
    if not teacher.capabilities.pf_ode or dict(teacher_cfg.data_shape) != shape:
        raise ConfigError(
            "objective.teacher must be a diffusion model's checkpoint (with a probability-flow ODE) trained on the same data shape "
            f"(teacher: {dict(teacher_cfg.data_shape)}, prediction {teacher.capabilities.prediction}; this run: {shape})"
        )
    mine, theirs = (_first_stage(c) for c in (cfg, teacher_cfg))
    if mine != theirs:  # latents of another autoencoder are other data
        what = lambda w: f"first stage {w[:12]}" if w else "pixel space"  # noqa: E731
        raise ConfigError(f"objective.teacher models {what(theirs)}, this run {what(mine)}; distil a teacher trained on the same first stage")
    objective.teacher = teacher


def init_from_teacher(student, teacher) -> None:
    """Start the distilled network from the teacher's weights, as the consistency-models recipe does
    (the module's EMA and target copies are made from it afterwards). Only the backbone's weights
    are copied: the student keeps its own consistency parameterization, so at step 0 it computes
    f = c_skip y + c_out F_teacher (F: the network output, equal for equal denoiser.{sigma_data,
    scale_input}), not the teacher's x0. A resumed run loads its checkpoint over this."""
    mismatch = state_mismatch(student.net.state_dict(), teacher.net.state_dict(), "the teacher", "the student")
    if mismatch is not None:
        raise ConfigError(
            f"objective.init_from_teacher=true needs the teacher's architecture, but {mismatch}; "
            "use the teacher's model config or set objective.init_from_teacher=false"
        )
    student.net.load_state_dict(teacher.net.state_dict())


