"""Decoding one image file for training: every PIL mode converted with its real bit depth, or
refused naming the file.

8-bit modes become "L" (grayscale) or "RGB" as before. Modes with more bits are not squeezed into
8 bits by PIL's convert (which saturates 16-bit values: about 98% of a typical 16-bit photo becomes
255); they become a float "F" image on the same 0..255 scale, so that 0 and the mode's maximum map
to -1 and 1 exactly like 0 and 255 of an 8-bit image:

- I;16 (16-bit PNG/TIFF, any byte order): value v -> v * 255 / 65535.
- I (32-bit integers; how Pillow opened 16-bit PNGs before 10.0): read as 16-bit, and refused when a
  value lies outside 0..65535 (the bit depth is then unknown).
- F (32-bit float, e.g. float TIFF): read as [0, 1] (v -> 255 v); refused outside [0, 1] or not finite.
- Transparency (RGBA, LA, PA, P with a transparent palette entry): composited over black, i.e. the
  premultiplied colour c * alpha. Dropping alpha would keep whatever colour lies under transparent
  pixels (often arbitrary); a fully opaque alpha changes nothing. RGBa/La are already premultiplied.
- P (palette) through its palette; 1 (bilevel) to 0/255; CMYK and YCbCr through PIL's conversion to
  RGB; modes PIL cannot convert to RGB (LAB, HSV, ...) are refused naming the file.

16-bit colour (48-bit RGB PNG) is opened by Pillow itself as 8-bit RGB (high byte of each value: a
correct, if coarser, scaling), so it arrives here as RGB.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

from diffctl.errors import ConfigError
from diffctl.filekinds import describe, unwrap

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


class ImageFileError(ConfigError):
    """An image file that cannot be decoded or converted; the message names it. Raised in a
    DataLoader worker, torch re-raises it in the main process with the worker's traceback as its
    message: the original one line is recovered from that."""

    def __init__(self, message: str):
        super().__init__(unwrap(str(message), ImageFileError))


def open_image(path: str, mode: str, resolution: int) -> Image.Image:
    """The image at `path` as mode `mode` ("L" or "RGB"), or for high-bit-depth files as an "F"
    image on the 0..255 scale (one channel; the caller repeats it for RGB)."""
    try:
        with Image.open(path) as img:
            img.draft(mode, (resolution, resolution))  # JPEG: decode at a reduced scale, much cheaper for big photos
            img.load()
            return convert(img, mode, path)
    except ImageFileError:
        raise
    except _DECODE_ERRORS as err:
        text = " ".join(str(err).split()) or type(err).__name__
        raise ImageFileError(f"cannot read image {path} ({describe(path)}): {text}; replace or remove that file") from None


def convert(img: Image.Image, mode: str, path) -> Image.Image:
    """A loaded PIL image in `mode` ("L"/"RGB"), or "F" for the high-bit-depth modes (see module doc)."""
    if img.mode in (*SIXTEEN_BIT, "I", "F"):
        return _high_depth(img, path)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        img = over_black(img)
    elif img.mode in ("RGBa", "La"):  # already premultiplied: the colour bands are the image over black
        img = Image.fromarray(np.asarray(img)[..., :-1].squeeze(-1) if img.mode == "La" else np.asarray(img)[..., :3])
    if img.mode == mode:
        return img
    try:
        return img.convert(mode)
    except ValueError as err:
        raise ImageFileError(f"image {path} has PIL mode {img.mode}, which cannot be converted to {mode} ({err}); "
                             f"save it as RGB or grayscale") from None


def over_black(img: Image.Image) -> Image.Image:
    """An RGBA/LA image composited over black: round(c * alpha / 255), as 8-bit RGB/L."""
    arr = np.asarray(img).astype(np.float64)
    colour, alpha = arr[..., :-1], arr[..., -1:]
    out = np.rint(colour * alpha / 255.0).astype(np.uint8)
    return Image.fromarray(out[..., 0] if img.mode == "LA" else out)


def _high_depth(img: Image.Image, path) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not np.isfinite(arr).all() or lo < 0 or hi > 1:
            raise ImageFileError(f"image {path} has floating-point pixels in [{lo:.4g}, {hi:.4g}]; diffctl reads float "
                                 f"images as [0, 1]: rescale it, or save it as 8- or 16-bit")  # fmt: skip
        scale = 255.0
    else:
        if img.mode == "I" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise ImageFileError(f"image {path} has 32-bit integer pixels in [{int(arr.min())}, {int(arr.max())}], outside "
                                 f"the 16-bit range 0..65535, so its bit depth is unknown; save it as 8- or 16-bit")  # fmt: skip
        scale = 255.0 / 65535.0
    return Image.fromarray((arr.astype(np.float64) * scale).astype(np.float32))
