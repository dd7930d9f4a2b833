"""`diffctl sample resume=<dir>`: the finished shards under <dir>/partial/ are checked against the
run's config before any new sample is made, so that a shard that does not belong to the run (wrong
shape, dtype, labels or sample range) or does not load is named at once, not after all the
remaining samples were made.

Shards are written atomically (diffctl.files.atomic_write), so a kill mid-write leaves a
hidden temporary, never a torn shard-*.npz; a damaged one (a disk error, a hand copy cut short) is
still told apart here and named.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffctl.errors import ConfigError
from diffctl.filekinds import identify

SHARD_NAME = re.compile(r"shard-(\d+)-(\d+)\.npz")
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def read_run_config(path: Path, given: str):
    """The stored Hydra config of a run (.hydra/config.yaml), checked to be a YAML mapping."""
    from omegaconf import DictConfig, OmegaConf

    kind, what = identify(path)
    problem = None if kind == "text" else what
    if problem is None:
        try:
            stored = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001  yaml's and OmegaConf's parse errors have many types
            problem = f"not valid YAML ({' '.join(str(err).split())[:120]})"
        else:
            problem = None if isinstance(stored, DictConfig) else "a YAML list, not a mapping"
    if problem is not None:
        raise ConfigError(f"{given}: {path} is {problem}, not the run config diffctl wrote; "
                          f"that run cannot be resumed: start a new one without resume=")  # fmt: skip
    return stored


def read_manifest(path: Path) -> dict | None:
    """The JSON manifest of a run in progress (None when there is none), checked to be one."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"resume: {path} is not the JSON manifest diffctl wrote ({' '.join(str(err).split())}); "
                          f"it records the run's checkpoint: start a new run without resume=") from None  # fmt: skip
    if not isinstance(data, dict) or not {"ckpt", "sha256"} <= set(data):
        raise ConfigError(f"resume: {path} is not the manifest diffctl wrote (expected keys ckpt and sha256); "
                          f"start a new run without resume=")  # fmt: skip
    return data


def check_shards(partial: Path, num_samples: int, sample_shape: tuple[int, ...], dtype, labels: Callable | None) -> int:
    """Check every shard-*.npz in `partial` against the run; returns how many distinct samples they hold.

    sample_shape/dtype: one stored sample (uint8 HWC images, or model=gmm's float32 samples);
    labels(first, n): the class labels samples first..first+n-1 must carry, None for an
    unconditional run (then a shard must hold none)."""
    done: set[int] = set()
    for path in sorted(partial.glob("shard-*.npz")):
        problem = _shard_problem(path, num_samples, tuple(sample_shape), np.dtype(dtype), labels)
        if problem is not None:
            raise ConfigError(f"resume: shard {path} {problem}; delete that file to have its samples made again "
                              f"(the other shards are kept)")  # fmt: skip
        first, stop = (int(g) for g in SHARD_NAME.fullmatch(path.name).groups())
        done.update(range(first, stop))
    return len(done)


def _shard_problem(path: Path, num_samples: int, shape: tuple, dtype: np.dtype, labels) -> str | None:
    match = SHARD_NAME.fullmatch(path.name)
    if match is None:
        return "has a name diffctl does not write (shard-<first>-<stop>.npz)"
    first, stop = int(match[1]), int(match[2])
    if not 0 <= first < stop <= num_samples:
        return f"is named for samples {first}..{stop - 1}, outside this run's num_samples={num_samples}"
    kind, what = identify(path)
    if kind != "npz":
        return f"is {what}, not a .npz shard" + (" (truncated?)" if kind.endswith("damaged") else "")
    n = stop - first
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("samples", "calls") if k not in z.files]
            if missing:
                return f"has no {', '.join(missing)} array (found: {', '.join(z.files)})"
            samples, calls = z["samples"], z["calls"]
            stored_labels = z["labels"] if "labels" in z.files else None
    except _NPZ_ERRORS as err:
        return f"does not load: it is damaged or cut short ({' '.join(str(err).split())})"
    want = (n, *shape)
    if samples.shape != want or samples.dtype != dtype:
        return f"holds {samples.dtype} samples of shape {list(samples.shape)}, this run makes {dtype} {list(want)}"
    if calls.ndim != 0 or calls.dtype.kind not in "iu" or int(calls) < 0:
        return f"has a calls entry {calls.dtype} {list(calls.shape)}, not a count of network calls"
    if labels is None:
        return None if stored_labels is None else "holds class labels, but this run is unconditional"
    if stored_labels is None:
        return "holds no class labels, but this run is class-conditional"
    expected = np.asarray(labels(first, n))
    if stored_labels.shape != (n,) or stored_labels.dtype.kind not in "iu" or not np.array_equal(stored_labels, expected):
        return (f"holds class labels {stored_labels.ravel()[:4].tolist()}... that are not this run's "
                f"({expected[:4].tolist()}... for samples {first}..{stop - 1})")
    return None
