"""Compose a command's config in-process, as `diffctl <command> <overrides>` would, for scripts
(the benchmarks), notebooks and tests that call `train`/`sample` directly."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict


def compose_config(config_name: str, overrides: list[str], run_dir: str | Path) -> DictConfig:
    """The config `diffctl <config_name> <overrides>` would run with, writing to run_dir. Sets the
    Hydra runtime the task functions read (HydraConfig), then drops the hydra node as Hydra does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from diffctl.cli import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
