"""A set of input images named on the command line (`images=` of `diffctl inpaint` and `diffctl metrics`,
an .npz `ref=` of the latter; meant for `source=` too): `<dataset>:<split>` (diffctl/data.py's datasets, e.g.
digits:test), a folder of image files, or an .npz such as the samples.npz `diffctl sample` writes
(uint8 NHWC under `samples`, optional `labels`).

Everything comes back as float32 NCHW in [-1, 1] (0 -> -1, 255 -> 1, as in training) with labels when
the source has them. Images are never resized: inpainting masks are in pixel coordinates, so a folder's
images must all have one size (and the requested one, when given). Every problem is a one-line
ConfigError naming the file: corrupt or undecodable images, mixed sizes, values out of range,
an .npz without `samples`.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS

from diffctl.conditioning import CLASS_LABEL, IMAGE
from diffctl.errors import ConfigError
from diffctl.filekinds import identify
from diffctl.image_files import open_image
from diffctl.schema.choices import DATASETS, SPLITS

GRAY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_DATASET = re.compile(r"(\w+):(\w+)")
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass
class ImageSet:
    images: Tensor  # float32 [N, C, H, W] in [-1, 1] (raw=True: the stored float64 array, any shape)
    labels: Tensor | None  # int64 [N], when the source has labels
    names: list[str]  # one per image: its file name, or <spec>[i]
    source: str  # the spec it was read from

    def __len__(self) -> int:
        return self.images.shape[0]


def _check_shape(images: Tensor, channels, resolution, what: str) -> None:
    c, h, w = images.shape[1:]
    if channels is not None and c != channels:
        raise ConfigError(f"{what} has {c}-channel images, {channels} are needed")
    if resolution is not None and (h, w) != (resolution, resolution):
        raise ConfigError(f"{what} has {w}x{h} images, {resolution}x{resolution} are needed")


def _check_range(x: Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{what} holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.0 or hi > 1.0:
        raise ConfigError(f"{what} holds values in [{lo:.4g}, {hi:.4g}]; float images must lie in [-1, 1] (uint8: 0..255)")


def _from_dataset(name: str, split: str, spec: str, root, resolution, channels, limit, download) -> ImageSet:
    from diffctl.data import build_dataset, dataset_num_classes

    if split not in SPLITS:
        raise ConfigError(f"images={spec}: the split must be one of {', '.join(SPLITS)}, got {split!r}")
    ds = build_dataset(name, root=root, split=split, resolution=resolution, channels=channels, download=download, limit=limit)
    if len(ds) == 0:
        raise ConfigError(f"images={spec} holds no images")
    items = ds.__getitems__(list(range(len(ds)))) if hasattr(ds, "__getitems__") else [ds[i] for i in range(len(ds))]
    images = torch.stack([item[IMAGE] for item in items]).float()
    labels = torch.tensor([int(item[CLASS_LABEL]) for item in items], dtype=torch.int64)
    if dataset_num_classes(name, root) == 0:  # a flat imagefolder labels everything 0: no labels
        labels = None
    return ImageSet(images, labels, [f"{spec}[{i}]" for i in range(len(images))], spec)


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        subdirs = any(p.is_dir() for p in folder.iterdir())
        hint = " (images are read from the folder itself, not from its subfolders)" if subdirs else ""
        raise ConfigError(f"image folder {folder} holds no image files{hint}")
    return files


def _channels_of(path: Path) -> int:
    """1 for a grayscale file, else 3 (PIL reads only the header here; open_image reports bad files)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return 1 if img.mode in GRAY_MODES else 3
    except Exception:  # noqa: BLE001 -- open_image names the file and the problem
        return 3


def _from_folder(folder: Path, resolution, channels, limit) -> ImageSet:
    files = _folder_files(folder)[:limit]
    channels = _channels_of(files[0]) if channels is None else channels
    mode, rows, size = ("L" if channels == 1 else "RGB"), [], None
    for f in files:
        img = open_image(str(f), mode, 1 << 30)  # no reduced-scale JPEG decoding: sizes are checked exactly
        if size is None:
            size = img.size
        elif img.size != size:
            raise ConfigError(f"image {f} is {img.size[0]}x{img.size[1]}, the first image of {folder} is "
                              f"{size[0]}x{size[1]}; all images must have one size (they are not resized)")  # fmt: skip
        arr = np.asarray(img, dtype=np.float32)  # 0..255 (an "F" image keeps its finer steps)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if arr.shape[0] != channels:  # an "F" (high bit depth) image is one channel
            arr = np.repeat(arr, channels, axis=0)
        rows.append(torch.from_numpy(np.ascontiguousarray(arr)))
    images = torch.stack(rows).div_(127.5).sub_(1.0)
    _check_shape(images, channels, resolution, f"image folder {folder}")
    return ImageSet(images, None, [f.name for f in files], str(folder))


def _from_npz(path: Path, resolution, channels, limit, raw: bool) -> ImageSet:
    kind, what = identify(path)
    if kind != "npz":
        raise ConfigError(f"images={path} is {what}, not an .npz archive (`diffctl sample` writes samples.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "samples" not in z.files:
                raise ConfigError(f"{path} has no `samples` array (found: {', '.join(z.files) or 'none'})")
            samples = z["samples"][:limit]
            labels = z["labels"][:limit] if "labels" in z.files else None
    except _NPZ_ERRORS as err:
        raise ConfigError(f"{path} is a damaged .npz archive ({' '.join(str(err).split())[:200]})") from None
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != samples.shape[:1]):
        raise ConfigError(f"{path}: labels must be {len(samples)} integers, got {labels.dtype} of shape {list(labels.shape)}")
    labels = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    names = [f"{path.name}[{i}]" for i in range(len(samples))]
    if len(samples) == 0:
        raise ConfigError(f"{path} holds no samples")
    if raw:  # model=gmm: float samples of the mixture's shape, any values
        if samples.dtype.kind != "f":
            raise ConfigError(f"{path}: samples are {samples.dtype}; a mixture's samples are floats")
        x = torch.from_numpy(samples.astype(np.float64))
        if not bool(torch.isfinite(x).all()):
            raise ConfigError(f"{path} holds NaN or infinite samples")
        return ImageSet(x, labels, names, str(path))
    if samples.ndim != 4 or samples.shape[3] not in (1, 3):
        raise ConfigError(f"{path}: samples must be images N x H x W x C (C = 1 or 3), got shape {list(samples.shape)}")
    x = torch.from_numpy(samples).permute(0, 3, 1, 2).contiguous()
    if samples.dtype == np.uint8:
        images = x.float().div_(127.5).sub_(1.0)
    elif samples.dtype.kind == "f":
        images = x.float()
        _check_range(images, str(path))
    else:
        raise ConfigError(f"{path}: samples are {samples.dtype}; images are uint8 (0..255) or floats in [-1, 1]")
    _check_shape(images, channels, resolution, str(path))
    return ImageSet(images, labels, names, str(path))


def read_images(spec, *, root=None, resolution: int | None = None, channels: int | None = None,
                limit: int | None = None, download: bool = False, raw: bool = False) -> ImageSet:  # fmt: skip
    """The images of `spec` (see the module doc). resolution/channels: what the model needs (None:
    as stored; a dataset is resized by build_dataset, a folder's grayscale/RGB files are converted
    to `channels`, anything else must match). limit: the first `limit` images. root/download: for
    datasets other than digits. raw: an .npz of float mixture samples, returned unchanged (float64)."""
    spec = str(spec).strip()
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"the image limit must be a positive integer or null, got {limit!r}")
    path = Path(spec).expanduser()
    if spec.endswith(".npz") or (path.is_file() and identify(path)[0] == "npz"):
        if not path.exists():
            raise ConfigError(f"images={spec} does not exist")
        return _from_npz(path, resolution, channels, limit, raw)
    if path.is_dir():
        return _from_folder(path, resolution, channels, limit)
    m = _DATASET.fullmatch(spec)
    if m and m[1] in DATASETS:
        return _from_dataset(m[1], m[2], spec, root, resolution, channels, limit, download)
    if path.exists():
        raise ConfigError(f"images={spec} is {identify(path)[1]}; give a folder of images, an .npz or <dataset>:<split>")
    raise ConfigError(f"images={spec!r} is neither <dataset>:<split> ({', '.join(DATASETS)}; "
                      f"{'/'.join(SPLITS)}), an existing folder of images nor an .npz file")  # fmt: skip
