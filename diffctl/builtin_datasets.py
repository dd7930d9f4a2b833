"""The built-in datasets' files: sklearn's digits, MNIST and Fashion-MNIST (IDX files, gzipped or
not, directly in data.root or in torchvision's layout), CIFAR-10 (python batches, unpickled with
numpy arrays only); downloaded by torchvision when data.download=true. Each loader returns
(uint8 images N,H,W[,C], int64 labels) for one split."""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from diffctl.errors import DataError
from diffctl.filekinds import describe
from diffctl.schema.choices import SPLITS

_DIGITS_TEST = 297  # last 297 of sklearn's 1797 digits form the test split, leaving 1500 to train
_TV_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's <root>/<folder>/raw layout
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_FIX = "Set data.download=true on a machine with internet, or point data.root= at the directory holding the files."


def load_digits(split: str):
    """sklearn's 8x8 digits scaled to 0..255: the first 1500 for train, the last 297 for test."""
    from sklearn.datasets import load_digits as sklearn_digits

    d = sklearn_digits()
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


def load_idx(name: str, root: Path, split: str):
    """MNIST or Fashion-MNIST (name) from the IDX files under root (see ensure_files)."""
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


def load_cifar(root: Path, split: str):
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


def ensure_files(name: str, root: Path, download: bool) -> None:
    # before load_idx / load_cifar: they expect the files to be there
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
