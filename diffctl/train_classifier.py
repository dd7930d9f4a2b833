"""`diffctl train-classifier`: train a noise-conditional classifier p(y | x_t, t) for classifier guidance
on a labelled dataset under the chosen SDE, then report its accuracy against the noise level.

It is `diffctl train` with another network and loss: the same Lightning module (EMA, warmup, nan
policy, keyed randomness: diffctl.module.DiffusionModule with diffctl.classifier.ClassifierObjective),
callbacks, checkpoints, exact resume and DDP (diffctl.train's standard_callbacks, build_trainer, fit)."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig, open_dict

from diffctl.build import build_sde, plain
from diffctl.classifier import KIND, ClassifierObjective, build_classifier
from diffctl.classifier_report import accuracy_report, print_report, write_report
from diffctl.console import print_paths
from diffctl.errors import ConfigError
from diffctl.module import DiffusionModule
from diffctl.rundir import claims_run_dir
from diffctl.sharding import is_sharded
from diffctl.train import build_datamodule, fit_module, start_run

COMMAND = "train_classifier"
# Parts of the config that define what is trained; on resume they come from the checkpoint.
CLASSIFIER_KEYS = ("model", "sde", "data", "denoiser")


CLASSIFIER_TARGET = "diffctl.networks.classifier.EncoderClassifier"


def _check(cfg: DictConfig) -> None:
    target = str(cfg.model.get("_target_", ""))
    if target.startswith("diffctl.") and target != CLASSIFIER_TARGET:  # model=unet|dit|gmm: conf/model/ is train's group
        raise ConfigError(f"model._target_={target} is a diffusion model, not a classifier; train-classifier trains "
                          f"{CLASSIFIER_TARGET} (its default: leave model= unset and set model.<key>=...)")  # fmt: skip
    if is_sharded(cfg.trainer):  # diffctl's FSDP wraps denoisers; a classifier this size needs no sharding
        raise ConfigError("train-classifier trains with one process or DDP, not trainer.strategy=fsdp; use trainer=ddp")


@claims_run_dir(COMMAND)  # refuses a used run directory, locks it while writing
def train_classifier(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Train and report as `diffctl train-classifier` does; `callbacks`: extra Lightning callbacks."""
    run_dir, ckpt_path = start_run(cfg, COMMAND, CLASSIFIER_KEYS, KIND, _check)

    datamodule = build_datamodule(cfg)
    if datamodule.num_classes < 2:
        raise ConfigError(
            f"train-classifier needs class labels, but data={cfg.data.name} has {datamodule.num_classes or 'none'}"
            f"{' (a flat folder of images: put each class in its own subfolder)' if cfg.data.name == 'imagefolder' else ''}"
        )
    shape = {"channels": datamodule.channels, "resolution": datamodule.resolution, "num_classes": datamodule.num_classes}
    with open_dict(cfg):
        cfg.data_shape = shape
        cfg.kind = KIND  # load_classifier and resume= tell a classifier's checkpoint by it
    sde = build_sde(cfg)
    classifier = build_classifier(cfg, sde, shape)
    # the labels reach the loss through the classifier's conditioner (as a condition, never dropped)
    module = DiffusionModule(
        classifier,
        ClassifierObjective(sde),
        optim=plain(cfg.optim),
        ema=plain(cfg.ema),
        config=plain(cfg),
        seed=cfg.seed,
        random_flip=bool(cfg.data.get("random_flip", False)),
        nan_policy=cfg.nan_policy,
    )
    trainer, result = fit_module(cfg, run_dir, module, classifier.net, datamodule, ckpt_path, callbacks, "train-classifier")
    if trainer.is_global_zero:  # one report, by the first process, on its device
        report = accuracy_report(module.ema, datamodule.dataset("test"), cfg.report, device=trainer.strategy.root_device,
                                 held_out=cfg.data.name != "imagefolder")  # fmt: skip
        module.ema.to("cpu")
        paths = write_report(report, run_dir)
        print_report(report)
        print_paths({k: str(v) for k, v in paths.items()})
        result.update(clean_accuracy=report["clean"]["accuracy"], report=report, **{k: str(v) for k, v in paths.items()})
    return result
