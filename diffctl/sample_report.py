"""`diffctl sample`'s outputs: samples.npz and its PNG (grid or scatter plot), metrics.json, and the
table printed at the end. Every file is written atomically (diffctl.files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffctl.files import atomic_write, atomic_write_json
from diffctl.images import save_grid, save_scatter, to_uint8
from diffctl.networks.gmm import GaussianMixture

TABLE_COLUMNS = ("sampler", "steps", "classifier", "classifier_scale", "nfe_per_sample", "classifier_calls_per_sample",
                 "num_samples", "time_s", "images_per_s", "weights")  # fmt: skip
METRIC_COLUMNS = ("psnr", "ssim", "lpips", "consistency", "fid", "kid_mean", "is_mean", "pr_precision", "pr_recall", "sw2", "sw2_floor", "mean_error", "cov_error", "weights_tv")


def write_metrics(out_dir: Path, result: dict[str, Any]) -> None:
    atomic_write_json(out_dir / "metrics.json", result)


def write_samples(out_dir: Path, images: torch.Tensor, labels: torch.Tensor | None, mixture: GaussianMixture | None) -> None:
    """samples.npz (uint8 NHWC images, or model=gmm's raw float samples) and a PNG: an image grid,
    or for flat mixture samples a scatter plot of their first two coordinates over exact samples."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = images.cpu().numpy()
    arrays = {"samples": samples}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    atomic_write(out_dir / "samples.npz", lambda f: np.savez(f, **arrays))  # complete or absent, also when interrupted
    if mixture is None:
        save_grid(torch.from_numpy(samples[:64]), out_dir / "samples.png")
    elif len(mixture.shape) == 3 and mixture.shape[0] in (1, 3):
        save_grid(to_uint8(images[:64]), out_dir / "samples.png")
    else:
        exact = mixture.sample(len(images), torch.Generator().manual_seed(0))[0]
        save_scatter(images, out_dir / "samples.png", reference=exact)


def metric_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Table rows of the image metrics: KID and IS with their std over subsets/splits, FID marked
    when withheld or biased by a small sample count (the reasons are in the notes below the table)."""
    rows = []
    if result.get("kid_mean") is not None:
        rows.append(("kid (unbiased)", f"{result['kid_mean']:.4g} ± {result['kid_std']:.2g} (std over subsets)"))
    if "fid" in result:
        if result["fid"] is None and "FID withheld" in result.get("notes", ""):
            rows.append(("fid", f"withheld: {result['num_images']} samples are too few (see notes)"))
        elif result["fid"] is not None:
            label = f"fid (biased: N={result['num_images']})" if result.get("fid_small_n") else "fid"
            rows.append((label, f"{result['fid']:.4g}"))
    if result.get("is_mean") is not None:
        rows.append(("is", f"{result['is_mean']:.4g} ± {result['is_std']:.2g} (std over splits)"))
    if result.get("pr_precision") is not None:
        rows.append(("precision / recall", f"{result['pr_precision']:.4g} / {result['pr_recall']:.4g}"))
    return rows


def print_reference_and_notes(result: dict[str, Any], console) -> None:
    """The lines under a metrics table (`diffctl sample`, `diffctl metrics`): the reference set and
    detector, not in the table because an .npz or folder reference is a path, which a cell would cut;
    then the notes (withheld or biased FID, clamped KID subsets ...)."""
    if result.get("ref"):
        images = f"{result['ref_num_images']} images" if result.get("ref_num_images") else "mu/sigma only"
        console.print(f"reference: {result['ref']} ({images}), {result['detector']} detector", soft_wrap=True, highlight=False, markup=False)
    if result.get("notes"):
        for note in result["notes"].split("; "):
            console.print(f"note: {note}", soft_wrap=True, highlight=False, markup=False)


def print_table(result: dict[str, Any], out_dir: Path) -> None:
    from rich.console import Console

    from diffctl.console import print_paths, result_table, value_rows

    keys = [k for k in (*TABLE_COLUMNS, *METRIC_COLUMNS) if k not in ("fid", "kid_mean", "is_mean", "pr_precision", "pr_recall")]  # metric_rows shows those
    console = Console()
    console.print(result_table("diffctl sample", value_rows(result, keys) + metric_rows(result)))
    print_reference_and_notes(result, console)
    print_paths({"samples": out_dir / "samples.npz", "grid": out_dir / "samples.png", "metrics": out_dir / "metrics.json"}, console)
