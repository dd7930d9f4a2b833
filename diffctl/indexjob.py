"""A resumable job over sample indices 0..N-1, cut into contiguous shards, one per process, and
batches within each: the loop under `diffctl sample`, for any command whose item i depends only
on i (and the seed), so that the result is the same for any number of processes and batch size.

The command gives `make(first, n) -> batch`: a dict of CPU tensors, those with a leading dimension
n holding samples first..first+n-1, 0-d ones a per-batch figure (e.g. the network calls it took).
Every finished batch is written at once (diffctl.files.atomic_write) to
<run>/partial/shard-<first>-<stop>.npz by the process that made it; a later run (resume=) takes the
batches found there instead of making them again. `run_job` returns the samples of all processes
in index order.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffctl.files import atomic_write

PARTIAL = "partial"  # finished batches of a run in progress (shard-<first>-<stop>.npz)

Batch = dict[str, torch.Tensor]


def shard(num: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of sample indices 0..num-1 (sizes differ by at most one)."""
    return range(rank * num // world, (rank + 1) * num // world)


@dataclass
class JobResult:
    arrays: Batch  # every process's samples, in index order (on every rank)
    mine: Batch  # this process's share, in index order
    per_batch: dict[str, list] = field(default_factory=dict)  # the 0-d entries, one per batch of this process
    batches: int = 0  # batches of this process
    made: int = 0  # samples this process made (not taken from an earlier run)
    elapsed: float = 0.0  # seconds, from the first batch to the gathered arrays


def run_job(fabric, num: int, batch_size: int, partial: Path, make: Callable[[int, int], Batch], *,
            progress: bool = True, what: str = "sampling", unit: str = "images", required: tuple[str, ...] = ()) -> JobResult:  # fmt: skip
    """This process's share of indices 0..num-1 in batches of batch_size, each taken from a finished
    shard in `partial` or made by `make` and written there; then gathered from all processes.
    required: the keys a shard must hold to be used (else its samples are made again)."""
    from diffctl.console import JobProgress

    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    mine = shard(num, rank, world)
    starts = range(mine.start, mine.stop, batch_size)
    partial.mkdir(parents=True, exist_ok=True)
    finished = read_shards(partial, mine, required)  # earlier runs' finished samples of this rank's share
    parts: dict[str, list] = {}
    result = JobResult({}, {}, batches=len(starts))
    start = time.perf_counter()
    with JobProgress(progress and rank == 0, unit) as bar:
        task = bar.add_task(f"{what} ({world} process{'es' if world > 1 else ''})", total=len(mine))
        for first in starts:
            n = min(batch_size, mine.stop - first)
            batch = finished.take(first, n)
            if batch is None:
                batch = make(first, n)
                write_shard(partial, first, first + n, batch)
                result.made += n
            for key, value in batch.items():
                if value.ndim:
                    parts.setdefault(key, []).append(value)
                else:
                    result.per_batch.setdefault(key, []).append(value.item())
            bar.advance(task, n)
    result.mine = {key: torch.cat(values) for key, values in parts.items()}
    result.arrays = gather(fabric, result.mine, num)
    result.elapsed = time.perf_counter() - start
    return result


def shard_range(path: Path) -> tuple[int, int]:
    """(first, stop) of a shard-<first>-<stop>.npz."""
    first, stop = path.stem.split("-")[1:3]
    return int(first), int(stop)


def finished_count(partial: Path) -> int:
    """How many distinct samples the shards in `partial` hold (0 when there is no such directory)."""
    if not partial.is_dir():
        return 0
    return len({i for f in partial.glob("shard-*.npz") for i in range(*shard_range(f))})


def write_shard(partial: Path, first: int, stop: int, batch: Batch) -> None:
    """One finished batch, all or nothing: a temporary file renamed into place once it is on disk."""
    arrays = {key: value.cpu().numpy() for key, value in batch.items()}
    atomic_write(partial / f"shard-{first:010d}-{stop:010d}.npz", lambda f: np.savez(f, **arrays))


class Finished:
    """Samples that earlier runs finished, by index; take() returns a batch only if all of it is there."""

    def __init__(self, mine: range):
        self.lo = mine.start
        self.owner = np.full(len(mine), -1, dtype=np.int64)  # which piece holds sample lo + j
        self.pieces: list[tuple[int, dict[str, np.ndarray]]] = []  # (first, arrays)

    def add(self, first: int, arrays: dict[str, np.ndarray], length: int) -> None:
        lo, hi = max(first, self.lo), min(first + length, self.lo + len(self.owner))
        if lo < hi:
            self.owner[lo - self.lo : hi - self.lo] = len(self.pieces)
            self.pieces.append((first, arrays))

    def take(self, first: int, n: int) -> Batch | None:
        owners = self.owner[first - self.lo : first - self.lo + n]
        if len(owners) < n or (owners < 0).any():
            return None
        parts: dict[str, list] = {}
        pos = first
        for run in np.split(owners, np.flatnonzero(np.diff(owners)) + 1):  # runs of samples from one piece
            start, arrays = self.pieces[run[0]]
            for key, value in arrays.items():
                if value.ndim:
                    parts.setdefault(key, []).append(value[pos - start : pos - start + len(run)])
            pos += len(run)
        batch = {key: torch.from_numpy(np.concatenate(values)) for key, values in parts.items()}
        for key, value in self.pieces[owners[0]][1].items():  # per-batch figures: those of sample `first`'s batch
            if not value.ndim:
                batch[key] = torch.from_numpy(np.asarray(value))
        return batch


def read_shards(partial: Path, mine: range, required: tuple[str, ...] = ()) -> Finished:
    """The finished samples of `mine` in partial/shard-*.npz; an unreadable shard is named and skipped."""
    finished = Finished(mine)
    for path in sorted(partial.glob("shard-*.npz")):
        first, stop = shard_range(path)
        if stop <= mine.start or first >= mine.stop:
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {key: z[key] for key in (*required, *(k for k in z.files if k not in required))}
            per_sample = [value for value in arrays.values() if value.ndim]
            if any(len(value) != stop - first for value in per_sample):
                raise ValueError(f"holds {len(per_sample[0])} samples, its name says {stop - first}")
            finished.add(first, arrays, stop - first)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # unreadable: make those samples again
            print(f"warning: ignoring unreadable {path} ({str(err).splitlines()[0]}); its samples are made again")
    return finished


def gather(fabric, arrays: Batch, num: int) -> Batch:
    """All ranks' shards in index order (the shards are contiguous, so rank order is index order)."""
    if fabric is None or fabric.world_size == 1:
        return arrays
    pad = -(-num // fabric.world_size)  # all_gather needs equal shapes: pad every shard to the largest

    def gather_one(t: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros((pad, *t.shape[1:]), dtype=t.dtype, device=fabric.device)
        padded[: len(t)] = t
        parts = fabric.all_gather(padded).cpu()
        return torch.cat([parts[r][: len(shard(num, r, fabric.world_size))] for r in range(fabric.world_size)])

    return {key: gather_one(value) for key, value in arrays.items()}
