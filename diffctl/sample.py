"""`diffctl sample`: load a checkpoint, generate, and write samples.npz, a PNG grid and metrics.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffctl.build import load_denoiser
from diffctl.checkpoint import resolve_checkpoint
from diffctl.errors import CheckpointError, ConfigError
from diffctl.images import save_grid, to_uint8
from diffctl.samplers import SAMPLERS, generate


def newest_checkpoint(root: Path = Path("outputs")) -> Path:
    candidates = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no checkpoint found under {root.resolve()}; train one with `diffctl train` or pass ckpt=")
    return candidates[-1]


TABLE_COLUMNS = ("sampler", "steps", "nfe_per_sample", "num_samples", "time_s", "images_per_s", "weights")


def _check_options(cfg: DictConfig) -> None:
    """Checks that need no checkpoint: done before loading anything."""
    for key in ("steps", "num_samples", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg.sampler.name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {cfg.sampler.name!r}; choose one of {', '.join(SAMPLERS)}")


def _check_sampler_fits(cfg: DictConfig, prediction: str) -> None:
    if (prediction == "consistency") != (cfg.sampler.name == "consistency"):
        raise ConfigError(
            "consistency checkpoints sample with sampler=consistency, and sampler=consistency needs a consistency checkpoint "
            f"(this checkpoint predicts {prediction!r}, sampler is {cfg.sampler.name!r})"
        )


def _labels(cfg: DictConfig, num_classes: int, first: int, n: int, device) -> torch.Tensor | None:
    if num_classes == 0:
        if cfg.class_label is not None:
            raise ConfigError("class_label was given, but the checkpoint is unconditional")
        return None
    if cfg.class_label is not None:
        if not 0 <= int(cfg.class_label) < num_classes:
            raise ConfigError(f"class_label must be in [0, {num_classes - 1}], got {cfg.class_label}")
        return torch.full((n,), int(cfg.class_label), device=device)
    return torch.arange(first, first + n, device=device) % num_classes


def sample(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    _check_options(cfg)
    ckpt = resolve_checkpoint(cfg.ckpt).resolve() if cfg.ckpt else newest_checkpoint().resolve()
    if not cfg.ckpt:
        print(f"Using the newest checkpoint: {ckpt}")
    denoiser, train_cfg = load_denoiser(ckpt, use_ema=cfg.use_ema)
    _check_sampler_fits(cfg, denoiser.prediction)
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    denoiser.to(device)
    nfe = [0]
    denoiser.register_forward_hook(lambda *_: nfe.__setitem__(0, nfe[0] + 1))
    shape = train_cfg.data_shape
    image_shape = (shape.channels, shape.resolution, shape.resolution)

    from rich.progress import Progress

    images, labels, batches = [], [], range(0, cfg.num_samples, cfg.batch_size)
    start = time.perf_counter()
    with Progress(disable=not cfg.progress_bar) as progress:
        task = progress.add_task("sampling", total=cfg.num_samples)
        for first in batches:
            n = min(cfg.batch_size, cfg.num_samples - first)
            y = _labels(cfg, shape.num_classes, first, n, device)
            x = generate(denoiser, n, image_shape, cfg.sampler.name, cfg.steps, cfg.seed, y, device, first_index=first)
            images.append(to_uint8(x))
            if y is not None:
                labels.append(y.cpu())
            progress.advance(task, n)
    elapsed = time.perf_counter() - start

    out_dir.mkdir(parents=True, exist_ok=True)
    samples = torch.cat(images).numpy()
    arrays = {"samples": samples}
    if labels:
        arrays["labels"] = torch.cat(labels).numpy()
    np.savez(out_dir / "samples.npz", **arrays)
    save_grid(torch.from_numpy(samples[:64]), out_dir / "samples.png")
    result = {
        "checkpoint": str(ckpt),
        "weights": "ema" if cfg.use_ema else "raw",
        "sampler": cfg.sampler.name,
        "steps": cfg.steps,
        "nfe_per_sample": nfe[0] // len(batches),
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "time_s": round(elapsed, 3),
        "images_per_s": round(cfg.num_samples / elapsed, 2),
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result, out_dir)
    return result


def _print_table(result: dict[str, Any], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="diffctl sample")
    for key in TABLE_COLUMNS:
        table.add_column(key)
    table.add_row(*(str(result[k]) for k in TABLE_COLUMNS))
    Console().print(table)
    Console().print(f"samples: {out_dir / 'samples.npz'}  grid: {out_dir / 'samples.png'}  metrics: {out_dir / 'metrics.json'}")
