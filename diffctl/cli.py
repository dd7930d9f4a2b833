"""The `diffctl` console script: subcommands dispatched to Hydra applications."""

from __future__ import annotations

import os
import re
import sys
from importlib import resources
from pathlib import Path

import diffctl
from diffctl.reporting import condense_hydra_errors, print_error, user_errors

# Startup: this module imports neither torch, Lightning nor Hydra (`diffctl --help` answers without
# them), and a command's module (which imports torch and Lightning) only after Hydra composed its
# config and the schema accepted it (_validated), so a config error is reported without them.
# tests/test_cli_startup.py holds this; scripts/bench_cli.py times it.


def config_dir() -> Path:
    """The directory to compose configs from, its resolver (diffctl_run_dir) registered."""
    _register_resolvers()
    return _conf_root()


def _conf_root() -> Path:
    """conf/ ships inside the wheel as the `diffctl.conf` package; in a source checkout that was
    not installed it is the top-level conf/ directory next to the package."""
    try:
        path = Path(str(resources.files("diffctl.conf")))
        if (path / "train.yaml").is_file():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "conf"


def run_dir_name(root: str) -> str:
    """Directory for a new run: <root>/<date>/<time with microseconds>.

    Ranks started by torchrun or SLURM each run Hydra themselves, so they must agree on the name
    without talking: they use the launcher's shared job id. If there is none (torchrun without
    --rdzv-id/--standalone), ranks > 0 put their Hydra logs in a temporary directory instead of
    creating a second run directory; they write no outputs of their own.
    """
    env = os.environ
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return f"{root}/torchrun-{run_id}"
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS", "1") != "1":
        return f"{root}/slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_STEP_ID', '0')}"
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")) or 0)
    if rank > 0:
        import tempfile

        return tempfile.mkdtemp(prefix=f"diffctl-rank{rank}-")
    from datetime import datetime

    now = datetime.now()
    return f"{root}/{now:%Y-%m-%d}/{now:%H-%M-%S-%f}"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("diffctl_run_dir"):
        OmegaConf.register_new_resolver("diffctl_run_dir", run_dir_name, use_cache=True)


def config_groups() -> dict[str, list[str]]:
    root = _conf_root()
    groups = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        choices = sorted(f.stem for f in d.glob("*.yaml"))
        if choices:
            groups[d.name] = choices
    return groups


OUR_SOURCES = ("hydra", "main", "schema")  # Hydra's config sources that are conf/ and Hydra's own


def sets_sampler(overrides, sources=OUR_SOURCES) -> bool:
    """Whether a sampler node (sampler, sample_grid.sampler) may differ from what conf/ ships: a
    command-line override names one (`sampler=ddim`, `sampler.eta=2`, `+sample_grid.sampler.x=1`,
    `sample_grid={...}`), or configs come from elsewhere (--config-dir, hydra.searchpath)."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "sample_grid" or "sampler" in re.split(r"[.@/]", key):
            return True
    return any(provider not in OUR_SOURCES for provider in sources)


def _validated(cfg, command: str) -> None:
    """The schema check each command starts with (diffctl/schema), here before the command's module
    and with it torch and Lightning are imported: a config error then costs a fraction of a second.
    The samplers declare their options where they are defined, in modules that import torch
    (diffctl/samplers/registry.py), so their nodes are checked here only when the command line may have
    changed them; conf/'s own are valid (tests/test_sampler_registry.py), and the command validates
    the whole config again, samplers included, once it imported torch."""
    from hydra.core.hydra_config import HydraConfig

    from diffctl.schema import validate

    hydra = HydraConfig.get()
    validate(cfg, command, samplers=sets_sampler(hydra.overrides.task, [s.provider for s in hydra.runtime.config_sources]))


def _train_task(cfg):
    _validated(cfg, "train")
    from diffctl.train import train

    result = train(cfg)
    # Hydra sweepers (Optuna) optimise the task's return value.
    return result["loss"] if cfg.get("optimized_metric") == "train/loss" else result


def _train_classifier_task(cfg):
    _validated(cfg, "train_classifier")
    from diffctl.train_classifier import train_classifier

    return train_classifier(cfg)


def _train_autoencoder_task(cfg):
    _validated(cfg, "train_autoencoder")
    from diffctl.train_autoencoder import train_autoencoder

    return train_autoencoder(cfg)


def _sample_task(cfg):
    _validated(cfg, "sample")
    from diffctl.sample import sample

    return sample(cfg)


def _inpaint_task(cfg):
    _validated(cfg, "inpaint")
    from diffctl.inpaint_command import inpaint_command

    return inpaint_command(cfg)


def _fid_stats_task(cfg):
    _validated(cfg, "fid_stats")
    from diffctl.fid_stats import fid_stats

    return fid_stats(cfg)


def _metrics_task(cfg):
    _validated(cfg, "metrics_command")
    from diffctl.metrics_command import metrics_command

    return metrics_command(cfg)


def _export_task(cfg):
    _validated(cfg, "export")
    from diffctl.export import export

    return export(cfg)


def _distill_task(cfg):
    _validated(cfg, "distill")
    from diffctl.distill import distill

    return distill(cfg)


def _reflow_task(cfg):
    _validated(cfg, "reflow")
    from diffctl.reflow import reflow

    return reflow(cfg)


def _likelihood_task(cfg):
    _validated(cfg, "likelihood")
    from diffctl.likelihood import likelihood

    return likelihood(cfg)


# command -> (Hydra task, config name, one-line description)
SUBCOMMANDS = {
    "train": (_train_task, "train", "train a diffusion model"),
    "train-classifier": (_train_classifier_task, "train_classifier", "train a noise-conditional classifier for classifier guidance"),
    "train-autoencoder": (_train_autoencoder_task, "train_autoencoder", "train a KL autoencoder, the first stage of latent diffusion"),
    "distill": (_distill_task, "distill", "progressive distillation: halve a model's DDIM steps, round after round"),
    "reflow": (_reflow_task, "reflow", "rectified flow's reflow: pairs from a flow model, a straighter model trained on them"),
    "sample": (_sample_task, "sample", "generate images from a checkpoint (samples.npz, PNG grid, metrics.json)"),
    "inpaint": (_inpaint_task, "inpaint", "fill masked regions of images with a checkpoint (RePaint; inpainted.npz, grid, metrics)"),
    "fid-stats": (_fid_stats_task, "fid_stats", "precompute reference statistics for FID/KID"),
    "metrics": (_metrics_task, "metrics_command", "FID/KID/IS of any images (folder, .npz, run dir) against a reference"),
    "likelihood": (_likelihood_task, "likelihood", "negative log-likelihood (bits/dim) via the probability-flow ODE"),
    "export": (_export_task, "export", "write a checkpoint's EMA (or raw) weights as .safetensors + config JSON"),
}


def _usage() -> str:
    lines = [
        "usage: diffctl <command> [key=value ...] [--multirun] [--help]",
        "",
        "commands:",
    ]
    lines += [f"  {name:<16} {desc}" for name, (_, _, desc) in SUBCOMMANDS.items()]
    lines += ["", "config groups (choose with group=choice):"]
    lines += [f"  {g:<15} {' | '.join(c)}" for g, c in config_groups().items()]
    lines += [
        "",
        "examples:",
        "  diffctl train                                 # offline quickstart (digits, small U-Net, VP, DDPM loss)",
        "  diffctl train model=dit sde=ve objective=ncsn trainer.max_steps=2000",
        "  diffctl train --multirun model=unet,dit sde=vp,ve",
        "  diffctl train-autoencoder                     # a KL autoencoder; then: diffctl train first_stage=<its run dir>",
        "  diffctl distill ckpt=<train run> teacher_steps=64 rounds=3  # students of 32, 16 and 8 DDIM steps",
        "  diffctl sample sampler=ode steps=50           # sample from the newest checkpoint under outputs/",
        "  diffctl inpaint mask=center                   # RePaint the middle of 16 test digits (inpainted.npz)",
        "  diffctl fid-stats data=cifar10 data.root=data # cache FID/KID reference statistics",
        "  diffctl metrics images=outputs/sample/<date>/<time> ref=digits:train  # score any images (FID/KID/IS)",
        "  diffctl likelihood num_batches=4              # bits/dim of the test split (PF-ODE, Hutchinson trace)",
        "  diffctl train --help                          # every config key of train",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("-V", "--version"):
        print(diffctl.__version__)
        return 0
    if command not in SUBCOMMANDS:
        print_error(f"unknown command {command!r}; choose one of: {', '.join(SUBCOMMANDS)} (see `diffctl --help`)")
        return 2
    import hydra

    task, config_name, _ = SUBCOMMANDS[command]
    # Hydra reads sys.argv; its program name shows up in --help output.
    sys.argv = [f"diffctl {command}", *rest]
    condense_hydra_errors(multirun=any(arg in ("-m", "--multirun") for arg in rest))
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(user_errors(task))
    if command in ("train", "train-classifier", "train-autoencoder"):  # they handle signals themselves once training starts (diffctl.callbacks)
        app()
        return 0
    from diffctl.signals import CommandInterrupted, stop_on_signals

    # Until the command's own handler takes over (diffctl.signals): Hydra's setup, the imports.
    try:
        with stop_on_signals(lambda: "it had not started its work and wrote nothing; run the command again"):
            app()
    except CommandInterrupted as err:
        print_error(err)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
