"""Training data: the pixel transform, in-memory image datasets, `build_dataset` and the Lightning
DataModule. The built-in datasets' files are read by diffctl/builtin_datasets.py, user image
folders by diffctl/image_folders.py.

Every dataset yields ``(x, y)``: ``x`` float32 in [-1, 1] with shape
[channels, resolution, resolution], ``y`` an int class label. The small built-in datasets
(digits, MNIST, Fashion-MNIST, CIFAR-10) are held in memory as uint8 arrays; user image
folders are decoded lazily with PIL.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from diffctl.builtin_datasets import ensure_files, load_cifar, load_digits, load_idx
from diffctl.errors import DataError
from diffctl.image_folders import image_classes, load_imagefolder
from diffctl.rng import GlobalBatchSampler, batches_consumed
from diffctl.conditioning import CLASS_LABEL, IMAGE
from diffctl.schema.choices import DATASETS, SPLITS

_NATIVE = {"digits": (8, 1), "mnist": (28, 1), "fashion_mnist": (28, 1), "cifar10": (32, 3)}  # (resolution, channels)


# ---------------------------------------------------------------- pixels


def _scale(x: torch.Tensor) -> torch.Tensor:
    """uint8 [C,H,W] -> float32 in [-1, 1] (0 -> -1.0, 255 -> 1.0 exactly)."""
    return x.float().div_(127.5).sub_(1.0)


class _Transform:
    """PIL image -> [-1, 1] tensor: channel conversion, resize shorter side + center crop, optional flip."""

    def __init__(self, resolution: int, channels: int, random_flip: bool):
        self.resolution, self.channels, self.random_flip = resolution, channels, random_flip
        self.mode = "L" if channels == 1 else "RGB"

    def resize(self, img: Image.Image) -> Image.Image:
        """The deterministic part: channel conversion, resize of the shorter side, center crop."""
        # "F": a high-bit-depth image already converted by diffctl.image_files (0..255 scale, one channel)
        img, r = (img if img.mode == "F" else img.convert(self.mode)), self.resolution
        w, h = img.size
        if (w, h) != (r, r):
            s = r / min(w, h)
            nw, nh = max(r, round(w * s)), max(r, round(h * s))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - r) // 2, (nh - r) // 2
            img = img.crop((left, top, left + r, top + r))
        return img

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """uint8 [channels, resolution, resolution]; float32 on the same 0..255 scale for "F" images."""
        img = self.resize(img)
        if img.mode == "F":  # not rounded to 8 bits: the file's bit depth is kept
            return torch.from_numpy(np.array(img, dtype=np.float32))[None].repeat(self.channels, 1, 1)
        arr = torch.from_numpy(np.array(img, dtype=np.uint8))
        return arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.flip(_scale(self.pixels(img)))

    def flip(self, x: torch.Tensor) -> torch.Tensor:
        """A random horizontal flip of one image [C,H,W] or, independently, of each image of a batch."""
        if not self.random_flip:
            return x
        if x.ndim == 3:
            return x.flip(-1) if torch.rand(()) < 0.5 else x
        flip = (torch.rand(x.shape[0]) < 0.5)[:, None, None, None]
        return torch.where(flip, x.flip(-1), x)


class ArrayImageDataset(Dataset):
    """In-memory uint8 images, [N,H,W] (grayscale) or [N,H,W,3] (RGB), with integer labels.

    Images that need resizing or converting are converted once, up front, when the result fits in
    `PRESIZE_LIMIT_BYTES` (PIL per item cost 4 ms of a 180 ms benchmark step); `__getitems__` then
    serves a whole batch with one indexing op. Beyond the limit, PIL runs per item as before."""

    PRESIZE_LIMIT_BYTES = 2**30

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: _Transform):
        self.labels, self.transform = labels.long(), transform
        r, c = transform.resolution, transform.channels
        native_c = 1 if images.ndim == 3 else images.shape[3]
        self._images = images  # native pixels, for the per-item PIL path
        self._chw: torch.Tensor | None = None  # uint8 [N, c, r, r] when served without PIL
        if images.shape[1] == images.shape[2] == r and native_c == c:
            self._chw = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
        elif len(images) * c * r * r <= self.PRESIZE_LIMIT_BYTES:
            out = np.empty((len(images), r, r) + ((c,) if c > 1 else ()), dtype=np.uint8)
            for i, img in enumerate(images.numpy()):
                out[i] = np.asarray(transform.resize(Image.fromarray(img)))
            self._chw = torch.from_numpy(out)[:, None] if c == 1 else torch.from_numpy(out).permute(0, 3, 1, 2)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> dict:
        """{"image": float [C, H, W] in [-1, 1], "class_label": int} (diffctl.conditioning's batch keys)."""
        y = int(self.labels[i])
        if self._chw is not None:
            return {IMAGE: self.transform.flip(_scale(self._chw[i])), CLASS_LABEL: y}
        return {IMAGE: self.transform(Image.fromarray(self._images[i].numpy())), CLASS_LABEL: y}

    def __getitems__(self, indices: list[int]) -> list:
        """A batch of samples for the DataLoader (which calls this when present) in one indexing op."""
        if self._chw is None:
            return [self[i] for i in indices]
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.transform.flip(_scale(self._chw[idx]))
        return [{IMAGE: xi, CLASS_LABEL: yi} for xi, yi in zip(x.unbind(0), self.labels[idx].tolist())]


# ---------------------------------------------------------------- public helpers


def check_dataset_options(name, root, resolution, channels, limit):
    """Check a dataset's options (data.name, root, resolution, channels, limit) and fill in the
    dataset's native resolution and channels where None; returns (root as Path or None, resolution,
    channels). One-line DataErrors; also how metrics checks a reference split before any work."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset data.name={name!r}; use one of: {', '.join(DATASETS)}.")
    native_res, native_c = _NATIVE.get(name, (None, 3))
    channels = native_c if channels is None else channels
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DataError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
    resolution = native_res if resolution is None else resolution
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise DataError(f"data.resolution must be a positive integer (image side in pixels), got {resolution!r}.")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise DataError(f"data.limit must be a positive integer or null (all images), got {limit!r}.")
    if name == "digits":
        return None, resolution, channels
    if root is None or str(root) == "":
        raise DataError(f"data.root is required for {name}: set data.root= to the dataset directory.")
    return Path(root).expanduser(), resolution, channels


def dataset_num_classes(name: str, root=None) -> int:
    """10 for the built-ins; for imagefolder the number of class subfolders (0 for a flat folder)."""
    if name == "imagefolder":
        classes = image_classes(check_dataset_options(name, root, 1, 3, None)[0])
        return 0 if classes is None else len(classes)
    check_dataset_options(name, root, None, None, None)
    return 10


def build_dataset(
    name: str = "digits",
    root=None,
    split: str = "train",
    resolution: int | None = None,
    channels: int | None = None,
    random_flip: bool = False,
    download: bool = False,
    limit: int | None = None,
) -> Dataset:
    """The dataset for one split; resolution/channels default to the dataset's native ones (imagefolder: RGB)."""
    root, resolution, channels = check_dataset_options(name, root, resolution, channels, limit)
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'test', got {split!r}.")
    transform = _Transform(resolution, channels, random_flip)
    if name == "imagefolder":  # a user folder has no held-out split: 'test' is the same images
        return load_imagefolder(root, transform, limit)
    if name == "digits":
        images, labels = load_digits(split)
    else:
        ensure_files(name, root, download)
        images, labels = (load_cifar if name == "cifar10" else functools.partial(load_idx, name))(root, split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return ArrayImageDataset(images, labels, transform)


# ---------------------------------------------------------------- Lightning


class DiffusionDataModule(L.LightningDataModule):
    """Serves dict batches: "image" float32 [B, channels, resolution, resolution] in [-1, 1], "class_label" int64."""

    def __init__(
        self,
        name: str = "digits",
        root: str | None = None,
        resolution: int | None = None,
        channels: int | None = None,
        random_flip: bool = False,
        download: bool = False,
        batch_size: int = 64,
        num_workers: int = 2,
        limit: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.name = name
        self.root, self._resolution, self._channels = check_dataset_options(name, root, resolution, channels, limit)
        for key, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DataError(f"data.{key} must be an integer >= {low}, got {value!r}.")
        self.random_flip, self.download, self.limit = bool(random_flip), bool(download), limit
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, int(seed)
        if not download:  # fail now, before the trainer builds anything
            ensure_files(name, self.root, download=False)
        self._num_classes = dataset_num_classes(name, self.root)  # also validates image folders
        self._datasets: dict[str, Dataset] = {}

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def resolution(self) -> int:
        return self._resolution

    @property
    def num_train(self) -> int:
        return len(self.dataset("train"))

    def prepare_data(self) -> None:  # Lightning runs this on one process per node: download only here
        if self.download and self.name not in ("digits", "imagefolder"):
            ensure_files(self.name, self.root, download=True)

    def dataset(self, split: str) -> Dataset:
        """The Dataset for 'train' (with flips and limit) or 'test' (unaugmented, complete); cached."""
        if split not in self._datasets:
            train = split == "train"
            self._datasets[split] = build_dataset(
                self.name, self.root, split, self._resolution, self._channels,
                random_flip=self.random_flip and train, download=self.download,
                limit=self.limit if train else None,
            )
        return self._datasets[split]

    def set_dataset(self, split: str, dataset: Dataset) -> None:
        """Serve `dataset` as `split` (latent diffusion: the training set's cached latents, diffctl/latent_training.py)."""
        self._datasets[split] = dataset

    def setup(self, stage: str | None = None) -> None:
        n = self.num_train
        if n < self.batch_size:  # drop_last would silently yield zero batches
            raise DataError(
                f"the training set has {n} images, fewer than data.batch_size={self.batch_size}; "
                f"lower data.batch_size or raise data.limit."
            )

    def train_dataloader(self) -> DataLoader:
        # Global-batch sampler instead of Lightning's DistributedSampler: every rank walks the same
        # seeded permutation, so DDP sees exactly the batches a single process would (diffctl.rng).
        trainer = self.trainer  # None when used outside a Trainer
        sampler = GlobalBatchSampler(
            self.num_train,
            self.batch_size,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            seed=self.seed,
        )
        if trainer is not None:
            # Resuming (mid-epoch too): continue the permutation where the checkpoint left the data.
            sampler.seek(batches_consumed(trainer))
        return DataLoader(
            self.dataset("train"),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
