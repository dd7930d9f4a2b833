"""What `diffctl sample source=...` (diffctl/img2img_job.py) writes: samples.npz with the outputs, their
sources and targets, the PNG grid (source | output | target per image) and the image metrics.

The metrics are computed on the saved uint8 outputs mapped back to [-1, 1] (data range 2):
- psnr, ssim: torchmetrics' peak_signal_noise_ratio and structural_similarity_index_measure
  (11 x 11 Gaussian window of std 1.5, K1 = 0.01, K2 = 0.03, reflection-padded borders) of each
  output against its target, averaged over images (SR3's and Palette's per-image mean). Targets only.
- lpips (diffctl/lpips.py, backbone weights from a local file, lpips=): the mean over images. Targets only.
- consistency (sr): SR3's consistency error, mean |downsample(output) - low| over pixels and images,
  with the checkpoint's own downsampling, in [-1, 1] units (x 127.5 = uint8 levels): how well an
  output explains its low-resolution source. Also without targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from diffctl.files import atomic_write
from diffctl.image_conditions import triplets
from diffctl.images import save_grid, to_uint8
from diffctl.lpips import NOT_COMPUTED

GRID_IMAGES = 16  # images shown in samples.png, four to a row
DATA_RANGE = 2.0  # pixels in [-1, 1]


def image_metrics(outputs: Tensor, sources, conditioner) -> dict[str, Any]:
    """{"psnr", "ssim", "lpips", "consistency"} (None where they do not apply) and "notes"."""
    import torchmetrics.functional.image as tm

    out: dict[str, Any] = {"psnr": None, "ssim": None, "lpips": None}
    notes = []
    if sources.targets is not None:
        a, b = outputs.double(), sources.targets.double()
        out["psnr"] = float(tm.peak_signal_noise_ratio(a, b, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3)).mean())
        out["ssim"] = float(tm.structural_similarity_index_measure(a, b, data_range=DATA_RANGE, reduction="none").mean())
        if sources.lpips is not None:
            out["lpips"] = float(sources.lpips.scores(outputs, sources.targets).mean())
            out["lpips_backbone"] = sources.lpips.backbone
        else:
            notes.append(NOT_COMPUTED)
    else:
        notes.append("source= holds source images, not targets: no PSNR, SSIM or LPIPS")
    consistency = None if sources.given is None else conditioner.consistency(outputs, sources.given)
    if consistency is not None:
        out["consistency"] = consistency
    if notes:
        out["notes"] = "; ".join(notes)
    return out


def write_source_outputs(out_dir: Path, samples: Tensor, sources, conditioner) -> dict[str, Any]:
    """samples.npz (uint8 NHWC `samples`, `sources` as shown, `targets` when known) and samples.png;
    returns the image metrics."""
    arrays = {"samples": samples.cpu().numpy(), "sources": to_uint8(sources.shown).numpy()}
    if sources.targets is not None:
        arrays["targets"] = to_uint8(sources.targets).numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "samples.npz", lambda f: np.savez(f, **arrays))  # the images first, whatever the metrics do
    outputs = samples.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # what was saved, back in [-1, 1]
    k = GRID_IMAGES
    targets = None if sources.targets is None else sources.targets[:k]
    tiles = triplets(sources.shown[:k], outputs[:k], targets)
    save_grid(to_uint8(tiles), out_dir / "samples.png", nrow=4 * (len(tiles) // len(outputs[:k])))
    return image_metrics(outputs, sources, conditioner)


def source_settings(cfg, sources, conditioner) -> dict[str, Any]:
    """The keys metrics.json records beyond sample's own."""
    return {"source": str(cfg.source), "source_kind": sources.kind, "condition": conditioner.name,
            "lpips_resize": cfg.get("lpips_resize") if cfg.get("lpips") else None}  # fmt: skip
