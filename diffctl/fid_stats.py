"""`diffctl fid-stats`: reference statistics of a dataset split, cached and written as ref_stats.npz."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from diffctl.files import atomic_write
from diffctl.errors import ConfigError
from diffctl.memory import check_fid_stats
from diffctl.metrics import load_detector, ref_source, reference
from diffctl.rundir import claims_run_dir
from diffctl.schema import validate
from diffctl.signals import interruptible


def _kept(cfg: DictConfig) -> str:
    return ("ref_stats.npz was not written, and the reference features are cached (metrics.cache_dir) only once all are "
            "computed; run the command again to compute them")


@interruptible(_kept)  # SIGTERM/SIGINT: one line, exit 1
@claims_run_dir("fid_stats")  # refuses a used run directory, locks it while writing
def fid_stats(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    validate(cfg, "fid_stats")  # every key's type and range (diffctl/schema/keys.py), before any work
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.metrics.ref is not None:
        raise ConfigError("fid-stats computes the statistics of data=<dataset> split=<split>; leave metrics.ref unset")
    src = ref_source(cfg.metrics, cfg.data, split=cfg.split)  # config errors before any weights are loaded
    check_fid_stats(cfg, src)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    detector = load_detector(cfg.metrics, device)
    ref = reference(cfg.metrics, src, detector, device, cfg.metrics.progress_bar)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "ref_stats.npz"
    # EDM's reference format (metrics.ref=<this file>); complete or absent, also when interrupted
    atomic_write(out, lambda f: np.savez(f, mu=ref.mu.numpy(), sigma=ref.sigma.numpy()))
    result = {
        "reference": ref.description,
        "images": ref.num_images,
        "detector": detector.name,
        "feature_dim": int(ref.mu.shape[0]),
        "cache": str(ref.path),
        "ref_stats": str(out),
    }
    _print_table(result)
    return result


PATH_KEYS = ("cache", "ref_stats")  # printed under the table, whole: a cell would fold a long path


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console

    from diffctl.console import print_paths, result_table, value_rows

    console = Console()
    console.print(result_table("diffctl fid-stats", value_rows(result, [k for k in result if k not in PATH_KEYS])))
    print_paths({key: result[key] for key in PATH_KEYS}, console)
