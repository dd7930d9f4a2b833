"""Finding, safely loading and atomically writing diffctl checkpoints.

Every load goes through `load_checkpoint`, which uses torch.load(weights_only=True): a file that
would need arbitrary unpickling (and could run code) is refused instead of executed.

Every write goes through `diffctl.files.atomic_write` (Lightning's saves through
`AtomicCheckpointIO`): a hidden temporary file in the same directory, flushed, then renamed over the
target, so a kill at any moment, a full disk or a crash leaves the previous complete file or the
new complete file, never a torn one (see diffctl/files.py).
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from fsspec.utils import get_protocol

from diffctl.errors import CheckpointError
from diffctl.files import DiskFullError, atomic_write
from diffctl.files import atomic_create  # noqa: F401  its former home; new code imports diffctl.files


CHECKPOINT_HINT = "a .ckpt from `diffctl train`, a run directory, or a .safetensors from `diffctl export`"
RESUME_HINT = "a .ckpt from `diffctl train` or its run directory"


def _hint(key: str) -> str:
    return RESUME_HINT if key == "resume" else CHECKPOINT_HINT


def resolve_checkpoint(path: str | Path, key: str = "ckpt") -> Path:
    """A .ckpt file, or a run directory (its checkpoints/last.ckpt). `key`: the config key the path
    was given as, for messages."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if candidate.is_file():
                return candidate
        steps = sorted(p.glob("checkpoints/step_*.ckpt"))
        found = f"; it has {steps[-1]}: give that file" if steps else ""
        raise CheckpointError(f"{key}={p} is a directory without checkpoints (expected {p / 'checkpoints' / 'last.ckpt'}){found}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p} (give a .ckpt file or a run directory under outputs/)")
    return p


def _not_a_checkpoint(p: Path, key: str) -> CheckpointError | None:
    """The error for a file that is not torch.save data, told from its bytes (None: it is)."""
    from diffctl.filekinds import TORCH_KINDS, identify

    kind, what = identify(p)
    if kind in TORCH_KINDS:
        return None
    if kind == "zip-damaged":
        return CheckpointError(f"cannot read checkpoint {key}={p}: the file is truncated or not a PyTorch checkpoint ({what})")
    extra = ""
    if kind == "safetensors":
        extra = "; exports hold no optimizer state: resume from the run's .ckpt" if key == "resume" else (
            f"; a `diffctl export` is read from its .safetensors path with the .json it wrote next to it ({p.with_suffix('.json').name})")
    return CheckpointError(f"{key}={p} is {what}, not a diffctl checkpoint ({_hint(key)}){extra}")


def _zip_format(path: Path) -> bool:
    """torch.save's zip format, which torch.load can memory-map (the legacy format cannot)."""
    return zipfile.is_zipfile(path)


def load_checkpoint(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """Load a checkpoint dict on the CPU without unpickling arbitrary objects. The file is
    identified first (diffctl.filekinds): anything that is not torch.save data is refused naming
    what it is. Tensors are memory-mapped (copy-on-write), so only those a caller touches are read:
    the config, or the EMA weights without the optimizer's state."""
    p = resolve_checkpoint(path, key)
    error = _not_a_checkpoint(p, key)
    if error is not None:
        raise error
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=_zip_format(p))
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {p}: it contains objects other than tensors and plain data, which could run "
            f"code when unpickled ({str(err).splitlines()[0]}). Only load checkpoints written by diffctl."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {key}={p}: the file is truncated or not a PyTorch checkpoint ({first})") from None
    if not isinstance(ckpt, dict):
        what = f"a {type(ckpt).__name__}" + (f" of shape {list(ckpt.shape)}" if isinstance(ckpt, torch.Tensor) else "")
        raise CheckpointError(f"{key}={p} holds {what}, not a diffctl training checkpoint ({_hint(key)})")
    if "state_dict" not in ckpt:
        keys = ", ".join(map(str, list(ckpt)[:5])) + (", ..." if len(ckpt) > 5 else "")
        raise CheckpointError(f"{key}={p} is not a diffctl training checkpoint (no 'state_dict' entry; its keys: {keys or 'none'}): "
                              f"{key}= takes {_hint(key)}")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    config = ckpt.get("hyper_parameters", {}).get("config")
    if not config:
        raise CheckpointError(f"{path} carries no diffctl run config; was it written by `diffctl train`?")
    return config


def denoiser_state(ckpt: dict[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The EMA (default) or raw denoiser weights, with the module prefix stripped."""
    prefix = "ema." if use_ema else "denoiser."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint has no {'EMA' if use_ema else 'raw'} weights (no '{prefix}*' keys)")
    return state


# ---------------------------------------------------------------- writing


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save(obj, path), atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoint IO, writing each local file atomically (see module doc).

    Lightning's own `_atomic_save` only serializes to memory first; the file itself is then
    overwritten in place, so a kill during the write leaves a truncated checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or get_protocol(str(path)) != "file":  # remote (s3://...): Lightning writes it
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            atomic_save(checkpoint, path)
        except DiskFullError as err:  # say how to go on: the last checkpoint is whole, resume from it
            last = Path(path).parent / "last.ckpt"
            if not last.is_file():
                raise DiskFullError(f"{err}; free space and run the command again") from None
            run = last.parent.parent if last.parent.name == "checkpoints" else last.parent
            raise DiskFullError(
                f"no space left on device while saving {path}; {last} (step {_step(last)}) is intact: "
                f"free space and resume with `diffctl train resume={run}`"
            ) from None


def _step(path: Path) -> str:
    """The global step a checkpoint was saved at, read from the file (for messages)."""
    try:
        return str(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", "?"))
    except Exception:  # noqa: BLE001  only decorates a message
        return "?"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
