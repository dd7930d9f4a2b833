"""Finding and safely loading diffctl checkpoints.

Every load goes through `load_checkpoint`, which uses torch.load(weights_only=True): a file that
would need arbitrary unpickling (and could run code) is refused instead of executed.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from diffctl.errors import CheckpointError


def resolve_checkpoint(path: str | Path) -> Path:
    """A .ckpt file, or a run directory (its checkpoints/last.ckpt)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"no checkpoint in run directory {p}: expected {p / 'checkpoints' / 'last.ckpt'}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p} (give a .ckpt file or a run directory under outputs/)")
    return p


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU without unpickling arbitrary objects."""
    p = resolve_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {p}: it contains objects other than tensors and plain data, which could run "
            f"code when unpickled ({str(err).splitlines()[0]}). Only load checkpoints written by diffctl."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"cannot read checkpoint {p}: the file is truncated or not a PyTorch checkpoint ({err})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{p} is not a diffctl training checkpoint (no 'state_dict' entry)")
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
