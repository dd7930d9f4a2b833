"""`diffctl train-autoencoder`: train a KL autoencoder (LDM's first stage) on images, report its
reconstructions and ELBO on a held-out split, and export its EMA weights as a diffusers AutoencoderKL
folder, <run>/autoencoder/, which `diffctl train first_stage=<run>` reads.

It is `diffctl train` with another network and loss: the same Lightning module, callbacks, atomic
checkpoints, exact resume and DDP (diffctl/autoencoder_training.py says how its loss fits in)."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from omegaconf import DictConfig, open_dict

from diffctl.autoencoder_report import autoencoder_report, print_report, write_report
from diffctl.autoencoder_training import KIND, TARGET, AutoencoderModule, AutoencoderObjective, build_trainee
from diffctl.build import plain
from diffctl.console import print_paths
from diffctl.errors import ConfigError
from diffctl.first_stage import EXPORT_DIR, save_autoencoder
from diffctl.performance import accelerator_type
from diffctl.rundir import claims_run_dir
from diffctl.sharding import is_sharded
from diffctl.train import build_datamodule, fit_module, start_run

COMMAND = "train_autoencoder"
# Parts of the config that define what is trained; on resume they come from the checkpoint.
AUTOENCODER_KEYS = ("model", "loss", "data")


def _check(cfg: DictConfig) -> None:
    target = str(cfg.model.get("_target_", ""))
    if target != TARGET:  # model=unet|dit|gmm: conf/model/ is train's group
        raise ConfigError(f"model._target_={target} is not an autoencoder; train-autoencoder trains {TARGET} "
                          "(its default: leave model= unset and set model.<key>=...)")  # fmt: skip
    if is_sharded(cfg.trainer):
        raise ConfigError("train-autoencoder trains with one process or DDP, not trainer.strategy=fsdp; use trainer=ddp")
    if cfg.report.split == "test" and cfg.data.name == "imagefolder":
        raise ConfigError("data=imagefolder has no test split for the report; set report.split=train (it then reports on training images)")


def _distributed(cfg: DictConfig) -> None:
    """DDP with the discriminator: it has no gradients before its start step (DDP must be told), and on
    GPUs its BatchNorm normalizes over the global batch (SyncBatchNorm), so N processes train as one.
    PyTorch's SyncBatchNorm is CUDA-only: CPU processes (trainer=ddp_cpu) normalize their own batches."""
    if not cfg.loss.discriminator.enabled or str(cfg.trainer.get("strategy")) != "ddp":
        return
    synchronized = accelerator_type(str(cfg.trainer.get("accelerator", "auto"))) == "cuda"
    with open_dict(cfg):
        cfg.trainer.strategy = "ddp_find_unused_parameters_true"
        cfg.trainer.sync_batchnorm = synchronized
    if not synchronized and os.environ.get("LOCAL_RANK", "0") == "0":
        print("note: the discriminator's BatchNorm normalizes each process's batch (SyncBatchNorm needs CUDA), "
              "so these processes do not train exactly as one process with their global batch")  # fmt: skip


@claims_run_dir(COMMAND)  # refuses a used run directory, locks it while writing
def train_autoencoder(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Train, report and export as `diffctl train-autoencoder` does; `callbacks`: extra Lightning callbacks."""
    run_dir, ckpt_path = start_run(cfg, COMMAND, AUTOENCODER_KEYS, KIND, _check)
    _distributed(cfg)

    datamodule = build_datamodule(cfg)
    shape = {"channels": datamodule.channels, "resolution": datamodule.resolution}
    with open_dict(cfg):
        cfg.data_shape = shape
        cfg.kind = KIND  # load_first_stage and resume= tell an autoencoder's checkpoint by it
    trainee = build_trainee(cfg, shape)
    module = AutoencoderModule(trainee, AutoencoderObjective(), optim=plain(cfg.optim), ema=plain(cfg.ema), config=plain(cfg),
                               seed=cfg.seed, random_flip=bool(cfg.data.get("random_flip", False)), nan_policy=cfg.nan_policy)  # fmt: skip
    trainer, result = fit_module(cfg, run_dir, module, trainee.autoencoder, datamodule, ckpt_path, callbacks, "train-autoencoder")
    if not trainer.is_global_zero:
        return result
    # one report and one export, by the first process, on its device
    autoencoder, loss = module.ema.autoencoder, trainee.loss
    report = autoencoder_report(
        autoencoder, datamodule.dataset(cfg.report.split), cfg.report, trainer.strategy.root_device, float(loss.logvar.detach()),
        loss.reconstruction, perceptual_or_adversarial=loss.lpips is not None or loss.discriminator is not None,
        metrics_cfg=cfg.metrics, data_cfg=cfg.data, progress=bool(cfg.progress_bar),
    )  # fmt: skip
    autoencoder.to("cpu")
    paths = write_report(report, run_dir)
    if report["scale_factor"]:  # the export carries LDM's scale factor, as Stable Diffusion's VAE does
        autoencoder.scaling_factor = autoencoder.config["scaling_factor"] = float(report["scale_factor"])
    export = run_dir / EXPORT_DIR
    if (export / "config.json").exists():  # a resumed run writing into its old directory: the old export is kept
        export = run_dir / f"{EXPORT_DIR}_step{trainer.global_step:07d}"
    save_autoencoder(autoencoder, export)
    print_report(report)
    print_paths({"autoencoder": str(export), **{k: str(v) for k, v in paths.items()}})
    report.pop("_images", None)
    return result | {"report": report, "autoencoder": str(export), **{k: str(v) for k, v in paths.items()}}
