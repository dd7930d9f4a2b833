"""Reproducible randomness for training: data order and per-step noise that do not depend on how
the global batch is split across processes.

Each rank draws the noise of the *global* batch from a generator keyed by (seed, step, micro-batch)
and keeps its own slice, and every rank walks the same seeded permutation of the data in global
batches. So N processes with batch B compute exactly what one process with batch N*B would, and
a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def mix_seed(*parts: int) -> int:
    """Mix integers into one 63-bit generator seed."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class BatchRandom:
    """Random draws for one micro-batch of `local_size` samples on `rank` of `world_size`."""

    def __init__(self, seed: int, step: int, micro: int, rank: int, world_size: int, local_size: int, device):
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(mix_seed(seed, step, micro))
        self.rank, self.world, self.local = rank, world_size, local_size
        self._rows = slice(rank * local_size, (rank + 1) * local_size)

    def _global_shape(self, shape) -> tuple[int, ...]:
        if shape[0] != self.local:
            raise ValueError(f"expected a leading batch dimension of {self.local}, got {tuple(shape)}")
        return (self.local * self.world, *shape[1:])

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        full = torch.randn(self._global_shape(shape), generator=self.gen, device=self.device, dtype=dtype)
        return full[self._rows]

    def rand(self, shape, dtype=torch.float32) -> torch.Tensor:
        full = torch.rand(self._global_shape(shape), generator=self.gen, device=self.device, dtype=dtype)
        return full[self._rows]

    def randint(self, high: int, shape) -> torch.Tensor:
        full = torch.randint(0, high, self._global_shape(shape), generator=self.gen, device=self.device)
        return full[self._rows]

    def stratified_uniform(self, n: int) -> torch.Tensor:
        """U[0,1) draws, one per 1/(global batch) stratum, randomly assigned to samples."""
        total = n * self.world
        u = (torch.arange(total, device=self.device) + torch.rand(total, generator=self.gen, device=self.device)) / total
        return u[torch.randperm(total, generator=self.gen, device=self.device)][self._rows]


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch of a seeded per-epoch permutation.

    Global batch k is perm[k*G:(k+1)*G] with G = batch_size * world_size; rank r gets rows
    [r*B:(r+1)*B] of it. Incomplete global batches are dropped so every rank steps equally.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.n, self.batch_size, self.rank, self.world, self.seed = num_samples, batch_size, rank, world_size, seed
        self.epoch = 0
        self.skip = 0  # batches of the current epoch already consumed before a resume

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at every epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches in a full epoch."""
        return self.n // (self.batch_size * self.world)

    def __iter__(self):
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=gen)
        g = self.batch_size * self.world
        skip, self.skip = self.skip, 0  # only the first epoch after resuming is partial
        for k in range(skip, len(self)):
            start = k * g + self.rank * self.batch_size
            yield perm[start : start + self.batch_size].tolist()
