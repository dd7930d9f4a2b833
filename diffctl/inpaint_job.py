"""`diffctl inpaint`'s pieces (the orchestration is diffctl/inpaint_command.py): the checks and inputs
made before any work, the batch of images first..first+n-1 as diffctl.indexjob stores it, and the
outputs (inpainted.npz, inpaint_grid.png, metrics.json, the table)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffctl.conditioning import CLASS_LABEL
from diffctl.errors import ConfigError
from diffctl.files import atomic_write, atomic_write_json
from diffctl.generation import SamplingModel
from diffctl.image_sources import ImageSet, read_images
from diffctl.images import save_grid, to_uint8
from diffctl.image_conditions import refuse_source_models
from diffctl.inpaint import inpaint, jump_schedule
from diffctl.inpaint_report import inpaint_grid, region_metrics
from diffctl.lpips import LPIPS, NOT_COMPUTED, from_config as lpips_from_config
from diffctl.masks import Masks, parse_masks
from diffctl.source import Source

GRID_ROWS = 16  # images shown in inpaint_grid.png (one row each: input with the hole | mask | result)


@dataclass
class Inputs:
    images: ImageSet  # the originals, float [-1, 1] NCHW
    masks: Masks  # 1 = known
    lpips: LPIPS | None = None  # loaded (and its file checked) before any work; None: no LPIPS

    def __len__(self) -> int:
        return len(self.images)


def prepare(cfg: DictConfig, source: Source) -> Inputs:
    """Every check that can fail, before any process is started: the model, the images against its
    shape, the mask against the images, the class labels and the schedule (ConfigError, one line)."""
    can = source.denoiser.capabilities
    refuse_source_models(can, source.description, "inpaint")
    if can.one_step:  # a consistency function's output at a level is not a posterior mean E[x0 | x_t]
        raise ConfigError(f"{source.description} is a consistency model (one step); inpainting needs a diffusion model")
    if source.codec is not None:  # RePaint replaces known pixels at every step; a latent model has no pixels until decoded
        raise ConfigError(f"{source.description} is a latent diffusion model; RePaint inpaints in pixel space: use a pixel-space checkpoint")
    if can.data_range is None or len(source.shape) != 3:
        raise ConfigError("diffctl inpaint needs an image checkpoint")
    c, h, w = source.shape
    images = read_images(cfg.images, root=cfg.images_root, resolution=h, channels=c, limit=cfg.limit)
    if tuple(images.images.shape[1:]) != (c, h, w):  # read_images checks; a dataset could still differ
        raise ConfigError(f"images={cfg.images} are {list(images.images.shape[1:])}, the model makes {[c, h, w]}")
    masks = parse_masks(cfg.mask, h, w, len(images))
    if cfg.class_label is not None and can.num_classes == 0:
        raise ConfigError(f"class_label={cfg.class_label}, but {source.description} is unconditional; leave class_label=null")
    if cfg.class_label is not None and cfg.class_label >= can.num_classes:
        raise ConfigError(f"class_label={cfg.class_label} is outside the model's classes 0..{can.num_classes - 1}")
    if can.num_classes and cfg.class_label is None and images.labels is not None and int(images.labels.max()) >= can.num_classes:
        raise ConfigError(f"images={cfg.images} has label {int(images.labels.max())}, the model knows classes "
                          f"0..{can.num_classes - 1}; set class_label=")  # fmt: skip
    jump_schedule(cfg.steps, cfg.jump_length, 1 if cfg.method == "replace" else cfg.resample)  # its ConfigError, now
    return Inputs(images, masks, lpips_from_config(cfg, h, w))


def batch_cond(cfg: DictConfig, source: Source, inputs: Inputs, first: int, n: int, device) -> dict:
    """Image i's condition: class_label, else its own label (images with labels), else i mod K."""
    conditioner = source.denoiser.conditioner
    if source.denoiser.capabilities.num_classes and cfg.class_label is None and inputs.images.labels is not None:
        return {CLASS_LABEL: inputs.images.labels[first : first + n].to(device)}
    return conditioner.for_samples(first, n, device, cfg.class_label)


def batch_maker(cfg: DictConfig, source: Source, inputs: Inputs, sampling: SamplingModel, device) -> Callable[[int, int], dict]:
    """make(first, n) for diffctl.indexjob.run_job: images first..first+n-1 inpainted, as uint8 NHWC,
    and the network calls they took (counted by sampling's forward hook, not taken from the library)."""

    def make(first: int, n: int) -> dict[str, torch.Tensor]:
        known = inputs.images.images[first : first + n].to(device)
        mask = inputs.masks.get(range(first, first + n), cfg.seed)
        before = sampling.calls[0]
        with sampling.autocast(device):  # precision= for the network only: the known pixels are put back exactly
            result = inpaint(sampling.model, known, mask, cfg.steps, cfg.method, cfg.seed, first,
                             batch_cond(cfg, source, inputs, first, n, device), cfg.jump_length, cfg.resample,
                             cfg.spacing, device, cfg.noise)  # fmt: skip
        return {"samples": to_uint8(result.images), "calls": torch.tensor(sampling.calls[0] - before, dtype=torch.int64)}

    return make


def write_outputs(out_dir: Path, inputs: Inputs, samples: torch.Tensor, seed: int) -> dict[str, float]:
    """inpainted.npz (uint8 NHWC `samples`, uint8 [N, H, W] `masks` with 1 = known, the images'
    `labels` if any) and inpaint_grid.png; returns the region metrics against the originals."""
    masks = inputs.masks.get(range(len(inputs)), seed)
    arrays = {"samples": samples.cpu().numpy(), "masks": masks[:, 0].numpy().astype(np.uint8)}
    if inputs.images.labels is not None:
        arrays["labels"] = inputs.images.labels.numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "inpainted.npz", lambda f: np.savez(f, **arrays))
    result = samples.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # what was saved, back in [-1, 1]
    original = inputs.images.images
    shown = original[:GRID_ROWS] * masks[:GRID_ROWS] + (1 - masks[:GRID_ROWS]) * -1.0  # the hole black
    save_grid(inpaint_grid(shown, masks[:GRID_ROWS], result[:GRID_ROWS])[None], out_dir / "inpaint_grid.png", nrow=1)
    metrics = region_metrics(result, original, masks, inputs.lpips)
    if inputs.lpips is None:
        metrics.update(lpips=None, lpips_masked=None)
        metrics["notes"] = NOT_COMPUTED
    else:
        metrics["lpips_backbone"] = inputs.lpips.backbone
    return metrics


TABLE = ("method", "steps", "jump_length", "resample", "nfe_per_sample", "num_images", "psnr_masked", "ssim_masked",
         "lpips", "lpips_masked", "time_s", "images_per_s", "weights")  # fmt: skip


def report(out_dir: Path, result: dict[str, Any]) -> None:
    """metrics.json and the table printed at the end."""
    from rich.console import Console

    from diffctl.console import print_paths, result_table, value_rows

    atomic_write_json(out_dir / "metrics.json", result)
    console = Console()
    console.print(result_table("diffctl inpaint", value_rows(result, TABLE)))
    if result.get("notes"):
        console.print(f"note: {result['notes']}")
    print_paths({"inpainted": out_dir / "inpainted.npz", "grid": out_dir / "inpaint_grid.png", "metrics": out_dir / "metrics.json"}, console)


def settings(cfg: DictConfig) -> dict[str, Any]:
    """The config keys metrics.json records."""
    keys = ("images", "mask", "method", "steps", "jump_length", "resample", "spacing", "seed", "noise", "class_label", "lpips",
            "lpips_resize")  # fmt: skip
    return {key: OmegaConf.select(cfg, key) for key in keys}
