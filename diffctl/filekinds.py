"""What a file really is, told from its first bytes and its structure, before anything loads it.

Every file diffctl reads (checkpoints, exports, caches, shards, reference statistics, mixture files,
dataset files) is identified here first, so that a wrong or damaged file is refused with one line
naming it and saying what it is ("a PNG image", "a zip archive cut short", "a text file") instead of
failing inside torch, numpy or zipfile with an error about something else.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

# (magic prefix, kind, description)
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png", "a PNG image"),
    (b"\xff\xd8\xff", "jpeg", "a JPEG image"),
    (b"GIF87a", "gif", "a GIF image"),
    (b"GIF89a", "gif", "a GIF image"),
    (b"II*\x00", "tiff", "a TIFF image"),
    (b"MM\x00*", "tiff", "a TIFF image"),
    (b"\x93NUMPY", "npy", "a NumPy .npy array (not an .npz archive)"),
    (b"\x1f\x8b", "gzip", "a gzip-compressed file"),
    (b"\x89HDF\r\n\x1a\n", "hdf5", "an HDF5 file (e.g. Keras weights)"),
    (b"%PDF", "pdf", "a PDF document"),
)
# How torch.save's legacy (pre-zip) format begins: a protocol-2 pickle of torch's magic number.
_TORCH_LEGACY = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
TORCH_KINDS = ("torch", "torch-legacy")


def identify(path: str | Path) -> tuple[str, str]:
    """(kind, description) of `path`. Kinds: missing, directory, empty, png, jpeg, gif, tiff, bmp,
    webp, npy, npz, gzip, hdf5, pdf, torch (torch.save's zip), torch-legacy, torchscript, zip,
    zip-damaged (a zip without its central directory: cut short), pickle, safetensors,
    safetensors-damaged, text, binary."""
    p = Path(path)
    if not p.exists():
        return "missing", "a path that does not exist"
    if p.is_dir():
        return "directory", "a directory"
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(4096)
    except OSError as err:
        return "unreadable", f"a file that cannot be read ({err.strerror})"
    if size == 0:
        return "empty", "an empty file (0 bytes)"
    for magic, kind, description in _MAGIC:
        if head.startswith(magic):
            return kind, description
    if head.startswith(b"BM") and len(head) >= 14 and struct.unpack("<I", head[2:6])[0] in (size, 0):
        return "bmp", "a BMP image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp", "a WebP image"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_kind(p)
    if head.startswith(_TORCH_LEGACY):
        return "torch-legacy", "a PyTorch file in the legacy (pre-1.6) format"
    if len(head) >= 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5):
        return "pickle", "a Python pickle (not written by torch.save)"
    safetensors = _safetensors_kind(p, head, size)
    if safetensors is not None:
        return safetensors
    text = _text(head)
    if text is not None:
        first = text.strip().splitlines()[0] if text.strip() else ""
        shown = first if len(first) <= 40 else first[:37] + "..."
        return "text", f"a text file (beginning {shown!r})" if shown else "a text file (whitespace only)"
    return "binary", f"a binary file of unknown type ({size} bytes, beginning {head[:8].hex(' ')})"


def describe(path: str | Path) -> str:
    return identify(path)[1]


def _zip_kind(p: Path) -> tuple[str, str]:
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "zip-damaged", "a zip archive cut short or damaged (no readable central directory: truncated?)"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript", "a TorchScript module (torch.jit.save)"
        return "torch", "a PyTorch file (torch.save)"
    if names and all(n.endswith(".npy") for n in names):
        return "npz", "a NumPy .npz archive"
    if any(n.endswith(".dist-info/WHEEL") for n in names):
        return "zip", "a Python wheel (zip archive)"
    return "zip", f"a zip archive that is not a PyTorch or NumPy file ({len(names)} members)"


def _safetensors_kind(p: Path, head: bytes, size: int) -> tuple[str, str] | None:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    n = struct.unpack("<Q", head[:8])[0]
    if n > 100_000_000:
        return None
    if 8 + n > size:
        return "safetensors-damaged", "a safetensors file cut short (its header runs past the end of the file)"
    with open(p, "rb") as f:
        f.seek(8)
        header = f.read(n)
    try:
        meta = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "safetensors-damaged", "a damaged safetensors file (its header is not JSON)"
    ends = [v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    if 8 + n + max(ends, default=0) > size:
        return "safetensors-damaged", "a safetensors file cut short (its tensors run past the end of the file)"
    return "safetensors", "a safetensors file"


def _text(head: bytes) -> str | None:
    if b"\x00" in head:
        return None
    for cut in range(4):  # a multi-byte character may straddle the end of the block read
        try:
            return head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def is_wrapped(message: str, cls: type) -> bool:
    return message.startswith(f"Caught {cls.__name__} ") and "Original Traceback" in message


def unwrap(message: str, cls: type) -> str:
    """The original message of an exception re-raised by a DataLoader worker (torch wraps it as
    "Caught X in DataLoader worker process N.\\nOriginal Traceback ...\\nmodule.X: message")."""
    if not is_wrapped(message, cls):
        return message
    marker = f"{cls.__name__}: "
    last = [line for line in message.splitlines() if marker in line]
    return last[-1].split(marker, 1)[1] if last else message.splitlines()[-1]
