"""Image conversion and PNG grids (written atomically: diffctl.files)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffctl.files import atomic_write


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float NCHW -> uint8 NHWC; clipping and rounding happen here and only here."""
    x = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2, min_tile: int = 32) -> np.ndarray:
    """uint8 NHWC -> one HxWxC uint8 grid; tiny images are upscaled (nearest) to min_tile px."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    scale = max(1, math.ceil(min_tile / max(h, w)))
    if scale > 1:
        images = images.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        h, w = h * scale, w * scale
    grid = torch.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = images[i]
    return grid.numpy()


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> np.ndarray:
    """A PNG grid of uint8 NHWC images, written atomically (a reader never sees half a PNG)."""
    grid = make_grid(images, nrow)
    image = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return grid


def save_scatter(points: Tensor, path: str | Path, reference: Tensor | None = None, size: int = 512) -> None:
    """PNG scatter plot of the first two coordinates of `points` [N, D] (dark) over `reference` (light
    grey), on a common square frame; for low-dimensional samples that are not images."""
    from PIL import ImageDraw

    sets = [p.reshape(p.shape[0], -1)[:, :2].double().cpu() for p in ((reference,) if reference is not None else ()) + (points,)]
    if sets[-1].shape[1] < 2:
        sets = [torch.cat([s, torch.zeros_like(s)], 1) for s in sets]
    both = torch.cat(sets)
    lo, hi = both.quantile(0.001, dim=0), both.quantile(0.999, dim=0)
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2 * 1.1 + 1e-12
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for pts, colour in zip(sets, ((200, 200, 200), (20, 60, 160)) if len(sets) == 2 else ((20, 60, 160),)):
        pix = ((pts - centre) / half + 1) / 2 * (size - 1)
        for u, v in pix.tolist():
            draw.point((u, size - 1 - v), fill=colour)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
