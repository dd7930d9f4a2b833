"""Training data: dataset loaders and the Lightning DataModule.

Every dataset yields ``(x, y)``: ``x`` float32 in [-1, 1] with shape
[channels, resolution, resolution], ``y`` an int class label. The small built-in datasets
(digits, MNIST, Fashion-MNIST, CIFAR-10) are held in memory as uint8 arrays; user image
folders are decoded lazily with PIL.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, ImageFolder

from diffctl.filekinds import describe
from diffctl.image_files import open_image
from diffctl.rng import GlobalBatchSampler, batches_consumed
from diffctl.conditioning import CLASS_LABEL, IMAGE
from diffctl.schema.choices import DATASETS, SPLITS

try:  # share the project-wide config error type when there is one
    from diffctl.errors import ConfigError as _ErrorBase
except ImportError:
    _ErrorBase = ValueError


class DataError(_ErrorBase):
    """The data config is invalid or the dataset files are missing."""


_NATIVE = {"digits": (8, 1), "mnist": (28, 1), "fashion_mnist": (28, 1), "cifar10": (32, 3)}  # (resolution, channels)
_DIGITS_TEST = 297  # last 297 of sklearn's 1797 digits form the test split, leaving 1500 to train
_TV_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's <root>/<folder>/raw layout
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_FIX = "Set data.download=true on a machine with internet, or point data.root= at the directory holding the files."


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


# ---------------------------------------------------------------- built-in datasets


def _load_digits(split: str):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    part = slice(None, -_DIGITS_TEST) if split == "train" else slice(-_DIGITS_TEST, None)
    return torch.from_numpy(images[part].copy()), torch.from_numpy(d.target[part].copy())


def _read_idx(path: Path) -> torch.Tensor:
    """Read an unsigned-byte IDX file (the MNIST format), gzipped or not."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as err:  # a .gz cut short or not gzip at all
        raise DataError(f"'{path}' cannot be read ({describe(path)}: {' '.join(str(err).split())}); re-download it.") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (it is {describe(path)}); re-download it or fix data.root=.")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"IDX file '{path}' is truncated (cut inside its header); re-download it.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"IDX file '{path}' is truncated ({arr.size} values, header says {shape}); re-download it.")
    return torch.from_numpy(arr.reshape(shape).copy())


def _find_idx(name: str, root: Path, split: str):
    """(images, labels) paths directly in root (e.g. Debian's layout) or in torchvision's <root>/<Folder>/raw."""
    for d in (root, root / _TV_FOLDER[name] / "raw"):
        found = []
        for kind, dims in (("images", 3), ("labels", 1)):
            stem = f"{_IDX_PREFIX[split]}-{kind}-idx{dims}-ubyte"
            found += [p for p in (d / stem, d / f"{stem}.gz") if p.is_file()][:1]
        if len(found) == 2:
            return found
    return None


def _load_idx(name: str, root: Path, split: str):
    img_path, lbl_path = _find_idx(name, root, split)
    images, labels = _read_idx(img_path), _read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"'{img_path}' and '{lbl_path}' do not form an image/label pair of matching length.")
    return images, labels


class _NumpyUnpickler(pickle.Unpickler):
    # CIFAR batches are pickles; only numpy array reconstruction is allowed so a hostile file cannot run code.
    _ALLOWED = {
        *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
        *((m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")),  # protocol 5
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 stores bytes
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _cifar_dir(root: Path, split: str):
    for d in (root / _CIFAR_DIR, root):  # root may be the parent (torchvision's layout) or the folder itself
        if all((d / f).is_file() for f in _CIFAR_FILES[split]):
            return d
    return None


def _load_cifar(root: Path, split: str):
    """Read the python-pickle CIFAR-10 batches: dicts with 'data' (N x 3072 uint8, R/G/B planes) and 'labels'."""
    d, images, labels = _cifar_dir(root, split), [], []
    for fname in _CIFAR_FILES[split]:
        try:
            with open(d / fname, "rb") as f:
                entry = _NumpyUnpickler(f, encoding="latin1").load()  # latin1: batches were pickled by Python 2
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            if len(entry["labels"]) != len(images[-1]):
                raise ValueError(f"{len(images[-1])} images but {len(entry['labels'])} labels")
            labels.extend(entry["labels"])
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, struct.error) as err:
            raise DataError(f"'{d / fname}' is not a CIFAR-10 python batch (it is {describe(d / fname)}: "
                            f"{' '.join(str(err).split())}); re-download it.") from None
    images = np.concatenate(images).transpose(0, 2, 3, 1)  # -> N,H,W,C
    return torch.from_numpy(np.ascontiguousarray(images)), torch.tensor(labels, dtype=torch.long)


def _files_present(name: str, root: Path) -> bool:
    if name in _TV_FOLDER:
        return all(_find_idx(name, root, s) for s in SPLITS)
    if name == "cifar10":
        return all(_cifar_dir(root, s) for s in SPLITS)
    return True


def _ensure_files(name: str, root: Path, download: bool) -> None:
    """Download if asked and needed; raise a DataError naming the fix when the files are still missing."""
    if _files_present(name, root):
        return
    if download:
        from torchvision import datasets

        cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
        try:  # torchvision fetches both splits and verifies checksums
            cls(str(root), train=True, download=True)
        except Exception as err:  # network errors come in many types; all mean the same to the user
            raise DataError(
                f"downloading {name} into '{root}' failed ({err}). Check internet access, or set "
                f"data.download=false and point data.root= at existing files."
            ) from err
        if _files_present(name, root):
            return
    if name == "cifar10":
        want = f"{_CIFAR_DIR}/data_batch_1..5 and test_batch"
    else:
        want = (f"train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-* directly there "
                f"or in '{root / _TV_FOLDER[name] / 'raw'}'")
    raise DataError(f"{name} files not found under '{root}' (looked for {want}). {_FIX}")


# ---------------------------------------------------------------- image folders


def _is_image(fname: str) -> bool:
    return fname.lower().endswith(IMG_EXTENSIONS)


def _has_image(d: Path) -> bool:
    return any(_is_image(f) for _, _, files in os.walk(d, followlinks=True) for f in files)


def _image_classes(root: Path):
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
    def find_classes(self, directory):  # same class list as _image_classes (torchvision would count hidden dirs)
        classes = _image_classes(Path(directory))
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


def _load_imagefolder(root: Path, transform: _Transform, limit):
    # each mode with its real bit depth; a file that cannot be decoded is named (diffctl.image_files)
    loader = functools.partial(open_image, mode=transform.mode, resolution=transform.resolution)
    if _image_classes(root) is None:
        ds = _FlatImages(root, loader, transform)
    else:
        ds = _ClassFolders(str(root), transform=transform, loader=loader)
    if limit is not None:  # files are sorted by class then name, so this keeps the first classes
        ds.samples, ds.targets = ds.samples[:limit], ds.targets[:limit]
        if hasattr(ds, "imgs"):
            ds.imgs = ds.samples
    return ds


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
        classes = _image_classes(check_dataset_options(name, root, 1, 3, None)[0])
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
        return _load_imagefolder(root, transform, limit)
    if name == "digits":
        images, labels = _load_digits(split)
    else:
        _ensure_files(name, root, download)
        images, labels = (_load_cifar if name == "cifar10" else functools.partial(_load_idx, name))(root, split)
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
            _ensure_files(name, self.root, download=False)
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
            _ensure_files(self.name, self.root, download=True)

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
