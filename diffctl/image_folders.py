"""User image folders (data.name=imagefolder): one subfolder per class, or a flat folder of images
labelled 0; hidden entries are skipped, and a folder that cannot be used is a one-line DataError.
Files are decoded lazily (diffctl.image_files)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, ImageFolder

from diffctl.conditioning import CLASS_LABEL, IMAGE
from diffctl.errors import DataError
from diffctl.image_files import open_image


def _is_image(fname: str) -> bool:
    return fname.lower().endswith(IMG_EXTENSIONS)


def _has_image(d: Path) -> bool:
    return any(_is_image(f) for _, _, files in os.walk(d, followlinks=True) for f in files)


def image_classes(root: Path):
    """Class subfolder names (sorted), or None for a flat folder of images. Raises DataError if unusable."""
    if not root.is_dir():
        raise DataError(
            f"imagefolder root '{root}' does not exist or is not a directory; set data.root= to your images."
        )
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]  # skip .git, .ipynb_checkpoints, ...
    if not entries:
        raise DataError(f"imagefolder root '{root}' is empty; put images in it (optionally one subfolder per class).")
    classes = sorted(p.name for p in entries if p.is_dir())
    if not classes:
        if not any(p.is_file() and _is_image(p.name) for p in entries):
            raise DataError(
                f"imagefolder root '{root}' contains no image files (supported: {', '.join(IMG_EXTENSIONS)})."
            )
        return None
    empty = [c for c in classes if not _has_image(root / c)]
    if empty:
        raise DataError(
            f"imagefolder class folders under '{root}' contain no image files: {', '.join(empty)}; "
            f"add images or remove them (supported: {', '.join(IMG_EXTENSIONS)})."
        )
    return classes




class _ClassFolders(ImageFolder):
    def find_classes(self, directory):  # same class list as image_classes (torchvision would count hidden dirs)
        classes = image_classes(Path(directory))
        return classes, {c: i for i, c in enumerate(classes)}

    def __getitem__(self, i: int) -> dict:
        x, y = super().__getitem__(i)
        return {IMAGE: x, CLASS_LABEL: y}


class _FlatImages(Dataset):
    """Top-level image files of a folder, all labelled 0."""

    def __init__(self, root: Path, loader, transform):
        self.samples = [(str(p), 0) for p in sorted(root.iterdir()) if p.is_file() and _is_image(p.name)]
        self.targets = [0] * len(self.samples)
        self.loader, self.transform = loader, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, y = self.samples[i]
        return {IMAGE: self.transform(self.loader(path)), CLASS_LABEL: y}


def load_imagefolder(root: Path, transform, limit):
    """The images of a folder (one subfolder per class, or flat: all labelled 0), the first `limit`;
    transform: diffctl.data's PIL-to-tensor transform (its mode and resolution pick the decoding)."""
    # each mode with its real bit depth; a file that cannot be decoded is named (diffctl.image_files)
    loader = functools.partial(open_image, mode=transform.mode, resolution=transform.resolution)
    if image_classes(root) is None:
        ds = _FlatImages(root, loader, transform)
    else:
        ds = _ClassFolders(str(root), transform=transform, loader=loader)
    if limit is not None:  # files are sorted by class then name, so this keeps the first classes
        ds.samples, ds.targets = ds.samples[:limit], ds.targets[:limit]
        if hasattr(ds, "imgs"):
            ds.imgs = ds.samples
    return ds
