"""Inpainting masks from a `mask=` value. Convention: 1 = known (the pixel is kept from the input),
0 = unknown (the model fills it in). In mask files white (255) is known and black (0) is to be
inpainted, as in RePaint's gt_keep_mask and diffusers' RePaintPipeline.

Values:
- center: the middle box of half the height and width is inpainted (rows H/4 .. H/4 + H/2, same for columns).
- box:x0,y0,x1,y1: the box of columns x0 <= x < x1 and rows y0 <= y < y1 is inpainted (pixel
  coordinates, origin top left, the right and bottom edges excluded, as PIL's boxes).
- random: per sample, a random box (sides 1/4 to 1/2 of the image's) joined with 1-3 free-form brush
  strokes, the hybrid masks of Palette (Saharia et al. 2022); reproducible from (seed, sample index) alone.
- a PNG file: one binary mask (only 0 and 255) for every image.
- a folder of PNG files: one mask per image, in sorted file-name order; their count must be the images'.
- known:i,j,... (flat samples only, `parse_flat_mask`): the known coordinates of D-dimensional samples.

Every bad value is a one-line ConfigError before any work: unknown kind, box out of the image,
wrong size, non-binary file, a mask with nothing to inpaint or nothing known.
Masks are float32 [N, 1, H, W], broadcast over channels.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffctl.errors import ConfigError
from diffctl.filekinds import identify
from diffctl.image_files import open_image
from diffctl.rng import mix_seed

KINDS = "center, box:x0,y0,x1,y1, random, a mask PNG or a folder of mask PNGs"
_BOX = re.compile(r"box:\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*")
_RANDOM_SALT = 0x3A5C  # keeps the masks' generators apart from other per-sample seeds


def _check_content(known: np.ndarray, what: str) -> None:
    """A mask must leave something to inpaint and something to condition on."""
    if known.all():
        raise ConfigError(f"{what} marks nothing to inpaint (all known, white); 0 (black) marks the region to fill")
    if not known.any():
        raise ConfigError(f"{what} keeps nothing known (all black): nothing to condition on; that is `diffctl sample`")


def _box_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    known = np.ones((height, width), dtype=bool)
    known[y0:y1, x0:x1] = False
    return known


def _read_png(path: Path, height: int, width: int) -> np.ndarray:
    """A binary mask file as booleans (True = known), checked for size and values."""
    kind, what = identify(path)
    if kind != "png":
        raise ConfigError(f"mask {path} is {what}, not a PNG (JPEG compression would blur a binary mask)")
    img = open_image(str(path), "L", 1 << 30)  # no reduced-scale decoding: the size must be exact
    arr = np.asarray(img)
    if arr.shape != (height, width):
        raise ConfigError(f"mask {path} is {arr.shape[1]}x{arr.shape[0]} pixels, the images are {width}x{height}")
    levels = np.unique(arr)
    if not set(levels.tolist()) <= {0, 255}:
        raise ConfigError(f"mask {path} is not binary: it has {len(levels)} gray levels; use only black (0, inpaint) "
                          f"and white (255, known)")  # fmt: skip
    known = arr == 255
    _check_content(known, f"mask {path}")
    return known


def _mask_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == ".png")
    if not files:
        raise ConfigError(f"mask folder {folder} holds no .png files")
    return files


def random_mask(height: int, width: int, seed: int, index: int) -> np.ndarray:
    """Palette-like hybrid mask of sample `index` (True = known): a random box, sides uniform in
    [1/4, 1/2] of the image's, joined with 1-3 brush strokes (polylines of 2-5 segments, each up to
    a third of the image long, 1/16 to 1/8 of it wide, with round joints). If the strokes would leave
    nothing known (tiny images), the box alone is kept (it never covers the whole image)."""
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(mix_seed(seed, index, _RANDOM_SALT))
    u = lambda lo=0.0, hi=1.0: lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))
    bh, bw = max(1, round(u(0.25, 0.5) * height)), max(1, round(u(0.25, 0.5) * width))
    y0, x0 = int(u() * (height - bh + 1)), int(u() * (width - bw + 1))
    box = _box_mask(height, width, min(x0, width - bw), min(y0, height - bh), min(x0, width - bw) + bw, min(y0, height - bh) + bh)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    size = max(height, width)
    for _ in range(1 + int(u() * 3)):
        x, y = u() * width, u() * height
        line_width = max(1, round(u(1 / 16, 1 / 8) * size))
        angle = u(0, 2 * math.pi)
        for _ in range(2 + int(u() * 4)):
            angle += u(-math.pi / 2, math.pi / 2)
            length = u(0.1, 1 / 3) * size
            nx = min(max(x + length * math.cos(angle), 0), width - 1)
            ny = min(max(y + length * math.sin(angle), 0), height - 1)
            draw.line((x, y, nx, ny), fill=255, width=line_width)
            r = line_width / 2
            draw.ellipse((nx - r, ny - r, nx + r, ny + r), fill=255)
            x, y = nx, ny
    known = box & (np.asarray(canvas) == 0)
    return known if known.any() else box


class Masks:
    """A parsed and checked `mask=` value for images of height x width, `num_images` of them.
    `get(indices, seed)` gives the masks of those sample indices."""

    def __init__(self, spec, height: int, width: int, num_images: int):
        self.spec, self.height, self.width, self.num_images = str(spec).strip(), int(height), int(width), int(num_images)
        self.kind, self._fixed, self._files = None, None, None
        s = self.spec
        if s == "center":
            self.kind = "center"
            h, w = max(1, height // 2), max(1, width // 2)
            y0, x0 = (height - h) // 2, (width - w) // 2
            self._fixed = _box_mask(height, width, x0, y0, x0 + w, y0 + h)
            _check_content(self._fixed, "mask=center")
        elif s == "random":
            self.kind = "random"
        elif s.startswith("box:"):
            self.kind = "box"
            m = _BOX.fullmatch(s)
            if m is None:
                raise ConfigError(f"mask={s}: a box is box:x0,y0,x1,y1 in integer pixel coordinates, e.g. box:2,2,6,6")
            x0, y0, x1, y1 = map(int, m.groups())
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise ConfigError(f"mask={s} is not a box inside the {width}x{height} images: it needs "
                                  f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")  # fmt: skip
            self._fixed = _box_mask(height, width, x0, y0, x1, y1)
            _check_content(self._fixed, f"mask={s}")
        else:
            path = Path(s).expanduser()
            if path.is_dir():
                self.kind = "folder"
                files = _mask_files(path)
                if len(files) != num_images:
                    raise ConfigError(f"mask folder {path} holds {len(files)} masks for {num_images} images; one per image is needed")
                self._files = [_read_png(f, height, width) for f in files]  # all checked before any work
            elif path.suffix.lower() == ".png" or path.is_file():
                if not path.exists():
                    raise ConfigError(f"mask file {path} does not exist")
                self.kind = "file"
                self._fixed = _read_png(path, height, width)
            else:
                raise ConfigError(f"unknown mask={s!r}; use {KINDS}")

    def get(self, indices, seed: int = 0) -> Tensor:
        """Masks of samples `indices` (positions in the image set), float32 [len(indices), 1, H, W], 1 = known."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.num_images]
        if bad:
            raise ValueError(f"sample index {bad[0]} outside the {self.num_images} images")
        if self.kind == "random":
            rows = [random_mask(self.height, self.width, seed, i) for i in indices]
        elif self.kind == "folder":
            rows = [self._files[i] for i in indices]
        else:
            rows = [self._fixed] * len(indices)
        stacked = np.stack(rows) if rows else np.zeros((0, self.height, self.width), dtype=bool)
        return torch.from_numpy(stacked.astype(np.float32))[:, None]


_COORDS = re.compile(r"known:\s*(\d+(?:\s*,\s*\d+)*)\s*")


def parse_flat_mask(spec, dim: int) -> Tensor:
    """For flat (non-image) samples of D coordinates, e.g. model=gmm with shape [D]: `known:i,j,...`
    lists the known coordinates (0-based). float32 [1, D], 1 = known, broadcast over samples."""
    m = _COORDS.fullmatch(str(spec).strip())
    if m is None:
        raise ConfigError(f"mask={spec!r}: for flat samples of {dim} coordinates give the known ones as known:i,j,... (e.g. known:0)")
    idx = sorted({int(v) for v in m[1].split(",")})
    if idx[-1] >= dim:
        raise ConfigError(f"mask={spec}: coordinate {idx[-1]} is outside the samples' {dim} coordinates (0..{dim - 1})")
    known = np.zeros(dim, dtype=bool)
    known[idx] = True
    _check_content(known, f"mask={spec}")
    return torch.from_numpy(known.astype(np.float32))[None]


def parse_masks(spec, height: int, width: int, num_images: int) -> Masks:
    """Check a `mask=` value against the images (see the module doc); ConfigError if it cannot work."""
    return Masks(spec, height, width, num_images)
