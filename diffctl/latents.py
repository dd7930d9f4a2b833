"""The latent cache of latent diffusion: a training set encoded once by the first stage (the autoencoder),
kept on disk, and the draws that turn it into training latents.

Each image is stored as its posterior's mean and standard deviation, not as one sample, so every
epoch draws a fresh z = mean + std * eps (LDM samples the posterior each step; EDM2 stores mean and
std for the same reason). A flipped image's latent is not the flipped latent, so with random flips
the mirror image is encoded too (as EDM2 does) and a flip picks the other encoding.

On disk, one directory per (first-stage weights, dataset, flips):
    latents.npy   float32 [N, F, 2 * Cz, h, w]   F = 2 with flips (original, mirrored), else 1;
                                                  channels: the mean's Cz, then the std's Cz
    labels.npy    int64 [N]
    meta.json     what it was made from (first-stage weights hash, dataset, flips, shapes)
It is written into a temporary directory renamed into place at the end, so a killed encoding leaves
no cache that looks complete; it is read memory-mapped, so nothing holds the encoded set in memory.

The latent scale: diffusion runs on (z - shift) * scale with scale = 1 / std(z) over the training
set (LDM's scale factor, which Rombach et al. estimate from one batch). Here std(z) is exact for the
cache: z of one element is a mixture over images of N(mean_i, std_i^2), whose variance is
mean_i(std_i^2) + var_i(mean_i) (the law of total variance), over all elements and flips.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffctl.conditioning import CLASS_LABEL, IMAGE
from diffctl.errors import DataError
from diffctl.files import atomic_write_json, json_text

LATENT = "latent"  # the batch key of cached posteriors: [B, F, 2 * Cz, h, w]
FORMAT = 1  # meta.json's format; a cache of another format is refused, not misread
LATENT_STREAM = 0x1A7E  # the posterior draws' own keyed stream (diffctl.rng.mix_seed), apart from the objective's noise


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values, in key order): which weights made a cache."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(meta: dict) -> str:
    """The directory name of a cache: a short hash of what it is made from."""
    made_from = {k: meta[k] for k in ("format", "first_stage", "dataset", "flips")}
    return hashlib.sha256(json_text(made_from).encode()).hexdigest()[:16]


def _batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(first index, images, labels) of consecutive batches, in dataset order (a DataLoader, so a
    dataset's batched __getitems__ is used)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
    start = 0
    for batch in loader:
        x, y = batch[IMAGE], batch[CLASS_LABEL]
        yield start, x, torch.as_tensor(y).long()
        start += len(x)


def build_cache(encode: Callable[[Tensor], tuple[Tensor, Tensor]], dataset: Dataset, directory: str | Path, meta: dict,
                batch_size: int = 64, flips: bool = False, progress: Callable[[int], None] | None = None) -> Path:
    """Encode `dataset` (items {IMAGE: x [C, H, W] in [-1, 1], CLASS_LABEL: y}, unaugmented) with `encode` (images ->
    posterior (mean, std), each [B, Cz, h, w]) into `directory`, atomically; returns it. `meta` says
    what the cache is made from (see `expected_meta`); `progress(n)` is called with images done."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n, latents, labels = len(dataset), None, np.empty(len(dataset), np.int64)
        for start, x, y in _batches(dataset, batch_size):
            views = [x, x.flip(-1)] if flips else [x]
            parts = [torch.cat(encode(v), 1).float().cpu() for v in views]  # [B, 2Cz, h, w] each
            if latents is None:
                shape = (n, len(views), *parts[0].shape[1:])
                latents = np.lib.format.open_memmap(tmp / "latents.npy", mode="w+", dtype=np.float32, shape=shape)
            latents[start:start + len(x)] = torch.stack(parts, 1).numpy()
            labels[start:start + len(x)] = y.numpy()
            if progress is not None:
                progress(start + len(x))
        if latents is None:
            raise DataError("the dataset to encode is empty")
        latents.flush()
        del latents
        np.save(tmp / "labels.npy", labels)
        atomic_write_json(tmp / "meta.json", {**meta, "num_images": n})
        if directory.exists():  # made meanwhile by another process from the same inputs: keep that one
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def expected_meta(first_stage_hash: str, dataset: dict, flips: bool, latent_shape: tuple[int, int, int]) -> dict:
    return {"format": FORMAT, "first_stage": first_stage_hash, "dataset": dict(dataset), "flips": bool(flips),
            "latent_shape": list(latent_shape)}


def check_cache(directory: str | Path, expected: dict) -> dict:
    """meta.json of a cache after checking it was made from `expected`'s first stage, dataset and flips;
    a one-line DataError naming the first difference otherwise (never re-encoded silently)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{directory} is not a complete latent cache (meta.json: {err.__class__.__name__}); "
                        f"delete it to encode the data again") from None  # fmt: skip
    for key, what in (("format", "format"), ("first_stage", "first-stage weights"), ("dataset", "dataset"), ("flips", "flips"),
                      ("latent_shape", "latent shape")):
        if meta.get(key) != expected[key]:
            raise DataError(f"the latent cache {directory} was made with other {what} ({meta.get(key)!r}, this run: "
                            f"{expected[key]!r}); point latent.cache_dir elsewhere or delete it")  # fmt: skip
    for name in ("latents.npy", "labels.npy"):
        if not (directory / name).is_file():
            raise DataError(f"the latent cache {directory} has no {name}; delete it to encode the data again")
    return meta


class LatentDataset(Dataset):
    """The cache's items as batches of {LATENT: [F, 2Cz, h, w], CLASS_LABEL: y}, memory-mapped."""

    def __init__(self, directory: str | Path, limit: int | None = None):
        self.directory = Path(directory)
        self._latents = None
        labels = np.load(self.directory / "labels.npy")
        self.labels = torch.from_numpy(labels[:limit] if limit is not None else labels)

    @property
    def latents(self) -> np.ndarray:
        if self._latents is None:  # opened lazily, so DataLoader workers each map it themselves
            self._latents = np.load(self.directory / "latents.npy", mmap_mode="r")
        return self._latents

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {LATENT: torch.from_numpy(np.array(self.latents[i])), CLASS_LABEL: self.labels[i]}

    def __getitems__(self, indices: list[int]) -> list:
        block = torch.from_numpy(np.array(self.latents[np.asarray(indices)]))
        return [{LATENT: block[j], CLASS_LABEL: self.labels[i]} for j, i in enumerate(indices)]


def latent_moments(directory: str | Path, chunk: int = 4096) -> tuple[float, float]:
    """(mean, std) of z ~ N(mean_i, std_i^2) over all cached images, elements and flips (exact: the law
    of total variance), read in chunks."""
    latents = np.load(Path(directory) / "latents.npy", mmap_mode="r")
    cz = latents.shape[2] // 2
    count, s_mean, s_mean2, s_var = 0, 0.0, 0.0, 0.0
    for start in range(0, latents.shape[0], chunk):
        block = np.asarray(latents[start:start + chunk], dtype=np.float64)
        mean, std = block[:, :, :cz], block[:, :, cz:]
        count += mean.size
        s_mean += mean.sum()
        s_mean2 += (mean**2).sum()
        s_var += (std**2).sum()
    m = s_mean / count
    var = s_var / count + s_mean2 / count - m * m
    return float(m), float(np.sqrt(max(var, 0.0)))


def draw_latents(stored: Tensor, flip: Tensor | None, rng, scale: float, shift: float = 0.0) -> Tensor:
    """Training latents (z - shift) * scale [B, Cz, h, w] from cached posteriors [B, F, 2Cz, h, w]:
    the mirrored encoding where `flip` [B] (bool) is set, then z = mean + std * eps with eps from
    `rng` (a diffctl.rng.BatchRandom keyed like the step's other draws, so resume and DDP redraw it)."""
    pick = flip.long().view(-1) if flip is not None and stored.shape[1] > 1 else torch.zeros(stored.shape[0], dtype=torch.long)
    post = stored[torch.arange(stored.shape[0], device=stored.device), pick.to(stored.device)]
    cz = post.shape[1] // 2
    mean, std = post[:, :cz], post[:, cz:]
    z = mean + std * rng.randn(tuple(mean.shape)).to(device=mean.device, dtype=mean.dtype)
    return (z - shift) * scale
