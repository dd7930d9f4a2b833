"""`diffctl train`: the Hydra task that builds everything from the config and runs Lightning."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from diffctl.build import (
    build_denoiser,
    class_conditional,
    build_objective,
    build_sde,
    check_stored_targets,
    instantiate_config,
    plain,
)
from diffctl.callbacks import DataPosition, StepCheckpoint
from diffctl.console import ParamSummary, StepProgressBar, route_library_logs
from diffctl.checkpoint import AtomicCheckpointIO, checkpoint_config, load_checkpoint, resolve_checkpoint
from diffctl.errors import CheckpointError, ConfigError
from diffctl.teacher import adopt_teacher_model, attach_teacher, init_from_teacher
from diffctl.pairs import attach_pairs
from diffctl.latent_training import encode_training_set, load_codec, resumed_codec, uses_first_stage
from diffctl.memory import check_train
from diffctl.networks.gmm import is_mixture
from diffctl.samplers import check_sampler, sampler_spec
from diffctl.schema import validate
from diffctl.module import DiffusionModule
from diffctl.performance import accelerator_type, speed_up, use_channels_last
from diffctl.rundir import claims_run_dir
from diffctl.sharding import check_resume, check_sharding, is_sharded, sharded_trainer_kwargs
from diffctl.train_outputs import SampleGrid, TrainSummary

# Parts of the config that define what is trained; on resume they come from the checkpoint.
MODEL_KEYS = ("model", "sde", "objective", "data", "denoiser", "conditional", "label_dropout", "condition", "first_stage", "latent")
# Keys of a data config that are hints for other groups, not DataModule arguments.
DATA_HINT_KEYS = ("ve_sigma_max",)


def apply_resume(cfg: DictConfig, command: str = "train", keys: tuple[str, ...] = MODEL_KEYS, kind: str | None = None) -> Path | None:
    """With resume=: the checkpoint's path, and `keys` of the config taken from it. `kind`: the
    stored config's `kind` a run of `command` continues (None: a diffusion model; "classifier")."""
    if not cfg.get("resume"):
        return None
    path = resolve_checkpoint(cfg.resume, "resume")
    ckpt = load_checkpoint(path, "resume")
    check_resume(ckpt, cfg.trainer, path)  # FSDP and the other strategies store Adam's state differently
    stored = checkpoint_config(ckpt, path)
    if stored.get("kind") != kind:  # a classifier's weights would not fit a denoiser, nor the reverse
        raise CheckpointError(f"resume={path} holds a {stored.get('kind') or 'diffusion model'} checkpoint; "
                              f"`diffctl {command.replace('_', '-')}` continues {kind or 'diffusion model'} runs only")
    check_stored_targets(stored, path)  # the stored config is instantiated below: only diffctl classes
    with open_dict(cfg):
        for key in keys:
            if key in stored:
                cfg[key] = stored[key]
            elif key == "condition" and key in cfg:  # checkpoints from before the condition group: none
                cfg[key] = {"name": "none"}
    shown = "/".join(k for k in keys[:4])
    validate(cfg, command, where=f"in the config of {path}, which resume= takes {shown} from")
    print(f"Resuming from {path} ({shown} taken from the checkpoint)")
    return path


def start_run(cfg: DictConfig, command: str, keys: tuple[str, ...], kind: str, check) -> tuple[Path, Path | None]:
    """The prologue of the side training commands (train-classifier, train-autoencoder): validate the
    config, quiet library logs, run the command's own `check(cfg)`, take `keys` from resume=, seed.
    Returns the run directory and the checkpoint to resume from (or None)."""
    validate(cfg, command)
    route_library_logs()
    check(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ckpt_path = apply_resume(cfg, command, keys, kind=kind)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return run_dir, ckpt_path


def fit_module(cfg: DictConfig, run_dir: Path, module, net, datamodule, ckpt_path, callbacks, command: str):
    """The fit of the side training commands: channels_last/compile of `net` (after the module made its
    EMA copy, which stays eager), the trainer with the standard callbacks and a TrainSummary, the fit.
    Returns the trainer and the command's result (run_dir, global_step, loss, images/s)."""
    speed_up(net, use_channels_last(cfg.channels_last, accelerator_type(cfg.trainer.get("accelerator", "auto"))), cfg.compile)
    summary = TrainSummary(str(run_dir), command=command)
    trainer = build_trainer(cfg, run_dir, [*(callbacks or []), *standard_callbacks(cfg, run_dir, []), summary])
    fit(trainer, module, datamodule, ckpt_path)
    metric = trainer.callback_metrics.get("train/loss")
    result = {"run_dir": str(run_dir), "global_step": trainer.global_step, "loss": float(metric) if metric is not None else None,
              **{k: summary.result.get(k) for k in ("images_per_s", "steady_images_per_s")}}  # fmt: skip
    return trainer, result


def _ddp_child_command(local_rank: int) -> tuple[list[str], str]:
    """Command Lightning runs for DDP ranks > 0 when it launches them itself.

    Lightning's own version replays sys.argv, which under `--multirun` would start a whole
    sweep per rank and under Hydra's timestamped dirs a second run directory. We replay only
    this job's overrides into this job's directory instead (cf. lightning-hydra-template #393).
    """
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    # the command of this job: its config's name (train, train_classifier -> train-classifier)
    command = [sys.executable, "-m", "diffctl", hc.job.config_name.replace("_", "-"), *hc.overrides.task]
    command += [
        f"hydra.run.dir='{hc.runtime.output_dir}'",
        f"hydra.job.name={hc.job.config_name}_ddp_rank{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def _patch_ddp_launcher() -> None:
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = _ddp_child_command


def _build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any] | bool:
    if not cfg.get("logger"):
        return False
    return [instantiate_config(cfg.logger, "logger")]


def _quiet_expected_warnings() -> None:
    # The EMA/target copies are in eval mode on purpose; Lightning warns about any such module.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # diffctl's batch sampler resumes mid-epoch (diffctl.rng); Lightning cannot see that it does.
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
    # A resumed run writes to its own new directory (or uses another checkpoint.every_n_steps); the
    # checkpoint callback then starts its bookkeeping afresh, which is what we want.
    warnings.filterwarnings("ignore", message=r".*The dirpath has changed from.*")
    warnings.filterwarnings("ignore", message=r".*callbacks used to create the checkpoint need to be provided.*")
    # Lightning warns when an epoch has fewer batches than log_every_n_steps, as if logging restarted each
    # epoch; it counts optimizer steps over the whole run, so step-based runs log every n steps regardless.
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    # FSDP's optimizer-state gather on gloo (CPU processes) asks torch for a deprecated default device.
    warnings.filterwarnings("ignore", message=r".*`_get_pg_default_device` will be deprecated.*")
    warnings.filterwarnings("ignore", message=r".*Multiple backends are registered with this ProcessGroup.*")


def build_datamodule(cfg: DictConfig):
    data_cfg = OmegaConf.masked_copy(cfg.data, [k for k in cfg.data if k not in DATA_HINT_KEYS])
    # Random flips happen in the training step from keyed generators (exactly reproducible on resume
    # and across DDP splits), not in the dataset, where they would draw from per-worker global RNGs.
    return instantiate_config(data_cfg, "data", seed=cfg.seed, random_flip=False)


@claims_run_dir("train")  # refuses a used run directory, locks it while writing
def train(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Train as `diffctl train` does; `callbacks` are extra Lightning callbacks (benchmarks, notebooks)."""
    validate(cfg, "train")
    _quiet_expected_warnings()
    route_library_logs()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if is_mixture(cfg.get("model")):
        raise ConfigError("model=gmm is the analytic Gaussian mixture: it has nothing to train; sample from it with `diffctl sample model=gmm`")
    ckpt_path = apply_resume(cfg)
    adopt_teacher_model(cfg)  # progressive distillation: the student is the teacher's model
    check_sharding(cfg)
    grid_sampler = sampler_spec(cfg.sample_grid.sampler)
    check_sampler(grid_sampler, key="sample_grid.sampler")  # the combinations of options the schema cannot express
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build_datamodule(cfg)
    if class_conditional(cfg) and datamodule.num_classes == 0:
        raise ConfigError(
            f"conditional=true needs class labels, but data={cfg.data.name} has none; "
            "use a dataset with classes or set conditional=false"
        )
    shape = {
        "channels": datamodule.channels,
        "resolution": datamodule.resolution,
        "num_classes": datamodule.num_classes if class_conditional(cfg) else 0,
    }
    codec = None
    if uses_first_stage(cfg):  # latent diffusion: the network models the first stage's latents
        codec, shape = load_codec(cfg, datamodule, shape, resumed_codec(cfg, ckpt_path))
    with open_dict(cfg):
        cfg.data_shape = shape
    attach_pairs(cfg, datamodule, shape)  # reflow: the training set is the flow model's (noise, sample) pairs
    check_train(cfg, datamodule, shape)  # before the dataset and the network are allocated
    if codec is not None:  # encoded once, cached on disk (diffctl/latents.py)
        encode_training_set(cfg, datamodule, codec, accelerator_type(cfg.trainer.get("accelerator", "auto")))

    sde = build_sde(cfg)
    objective = build_objective(cfg, sde)
    attach_teacher(cfg, objective, sde, shape)  # distillation: the teacher, checked against this run
    denoiser = build_denoiser(cfg, sde, objective, shape)
    with open_dict(cfg):  # the parameterization the run used, in the config its checkpoints store
        cfg.denoiser.prediction = denoiser.capabilities.prediction
    if getattr(objective, "teacher", None) is not None and objective.init_from_teacher:
        init_from_teacher(denoiser, objective.teacher)
    if not getattr(objective, "keeps_teacher", True):  # reflow: the teacher gave its weights, training needs no more
        objective.teacher = None

    module = DiffusionModule(
        denoiser,
        objective,
        optim=plain(cfg.optim),
        ema=plain(cfg.ema),
        config=plain(cfg),
        seed=cfg.seed,
        random_flip=bool(cfg.data.get("random_flip", False)),
        nan_policy=cfg.get("nan_policy", "stop"),
        first_stage=codec,
    )
    # After the module made its EMA (and target) copies: those stay plain eager modules. The target
    # takes the online network's memory layout: in another layout the same RNG state gives other
    # dropout masks (measured on CPU, where channels_last is the default). A compiled online network
    # draws its masks with inductor's own generator, so compile=true does not share them.
    # FSDP flattens each unit's weights into one contiguous tensor: auto means NCHW there.
    channels_last = not is_sharded(cfg.trainer) and use_channels_last(
        cfg.get("channels_last", False), accelerator_type(cfg.trainer.get("accelerator", "auto")))
    speed_up(denoiser.net, channels_last, cfg.get("compile", False))
    if module.target is not None:
        speed_up(module.target.net, channels_last)
    grid = SampleGrid(
        out_dir=str(run_dir / "samples"),
        every_n_steps=cfg.sample_grid.every_n_steps,
        num=cfg.sample_grid.num,
        sampler=denoiser.capabilities.default_sampler if denoiser.capabilities.one_step else grid_sampler,
        steps=cfg.sample_grid.consistency_steps if denoiser.capabilities.one_step else cfg.sample_grid.steps,
        seed=cfg.sample_grid.seed,
    )
    summary = TrainSummary(str(run_dir))
    callbacks = [*(callbacks or []), *standard_callbacks(cfg, run_dir, [grid]), summary]
    trainer = build_trainer(cfg, run_dir, callbacks)
    fit(trainer, module, datamodule, ckpt_path)
    metric = trainer.callback_metrics.get("train/loss")
    return {
        "run_dir": str(run_dir),
        "global_step": trainer.global_step,
        "loss": float(metric) if metric is not None else None,
        "skipped_steps": module.skipped_steps,
        **{k: summary.result.get(k) for k in ("images_per_s", "steady_images_per_s")},
    }


def standard_callbacks(cfg: DictConfig, run_dir: Path, own: list[L.Callback]) -> list[L.Callback]:
    """The callbacks of every diffctl training command, with the command's `own` in their place:
    step checkpoints (atomic; last.ckpt), the data position on resume, the parameter table and the
    step progress bar. The command appends its TrainSummary after them (the bar's last line is
    printed before the summary table)."""
    callbacks = [
        StepCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            filename="step_{step:07d}",
            every_n_train_steps=cfg.checkpoint.every_n_steps,
            save_top_k=-1,
            save_last="link",  # last.ckpt: a hard link to the step file just written (atomic, no second save)
            enable_version_counter=False,  # a resumed run writing into its old directory overwrites, never last-v1.ckpt
            auto_insert_metric_name=False,
            nan_check_every=cfg.trainer.get("log_every_n_steps") or 50,
        ),
        DataPosition(),
        *own,
    ]
    if cfg.trainer.get("enable_model_summary", True):
        callbacks.append(ParamSummary())  # Lightning's, without its all-zero FLOPs column
    if cfg.progress_bar:
        callbacks.append(StepProgressBar(refresh_rate=10))  # per-step refresh: quickstart 88 s -> 77 s with 10
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    """The Lightning Trainer of cfg.trainer with `callbacks`, the config's loggers, atomic checkpoint
    files and (trainer=ddp) diffctl's DDP child command."""
    _quiet_expected_warnings()
    loggers = _build_loggers(cfg, run_dir)
    if loggers:
        callbacks = [*callbacks, LearningRateMonitor(logging_interval="step")]
    _patch_ddp_launcher()
    return instantiate_config(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(run_dir),
        enable_progress_bar=bool(cfg.progress_bar),
        enable_model_summary=False,  # ParamSummary above, when trainer.enable_model_summary
        plugins=[AtomicCheckpointIO()],  # every checkpoint file written to a temporary and renamed
        **sharded_trainer_kwargs(cfg.trainer),  # trainer.strategy=fsdp: diffctl's FSDP wrapping (diffctl/sharding.py)
    )


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule, ckpt_path: Path | None) -> None:
    """trainer.fit (from ckpt_path when resuming), leaving no process group or DDP environment behind."""
    environ = dict(os.environ)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    finally:
        # The next job of a --multirun sweep runs in this process and needs a fresh process group.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        # Lightning's DDP launcher leaves WORLD_SIZE/MASTER_PORT/... in os.environ, which would make
        # the next job believe it was launched externally and wait for peers that never come.
        os.environ.clear()
        os.environ.update(environ)
