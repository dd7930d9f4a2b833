"""The reference set of FID/KID: where it comes from (`ref_source`), the detector features of image
batches (`extract`), and its statistics (`reference`), computed once on one or many processes and
cached under cache_dir/fid_refs/. Shared by `diffctl sample`, `diffctl fid-stats` and `diffctl metrics`.

A reference is a dataset split (<dataset>:<split>), a folder of images (read as data=imagefolder: its
class subfolders too, resized and converted like a dataset), an .npz of images (a `samples` array, as
samples.npz; read by diffctl/image_sources.py, never resized) or an .npz of statistics (mu, sigma).
"""

from __future__ import annotations

import hashlib
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor

from diffctl.checkpoint import file_sha256
from diffctl.collectives import broadcast, distributed, gather_rows, on_rank0, process_rank
from diffctl.conditioning import IMAGE
from diffctl.data import SPLITS, build_dataset, check_dataset_options
from diffctl.detectors import Detector, cache_dir, one_line
from diffctl.errors import ConfigError
from diffctl.filekinds import identify
from diffctl.files import atomic_write
from diffctl.images import to_uint8
from diffctl.metric_formulas import feature_stats

_CACHE_VERSION = "v2"  # bump when the cached features would change (detector preprocessing, conversion);
# v2: image folders read 16-bit files at their bit depth and composite transparency over black
NPZ_IMAGES = "npz"  # src["name"] of an .npz of images (a `samples` array)


def ref_limit(cfg: DictConfig, num_samples: int | None) -> int | None:
    """Reference images to use (None = all). auto: all for num_samples >= fid_min_samples (FID is
    reported, the standard protocol) or without a sample count (fid-stats); the first quick_ref_limit
    for fewer samples, where only KID/IS are reported and a bounded first run matters more."""
    if cfg.ref_limit != "auto":
        return cfg.ref_limit
    return None if num_samples is None or num_samples >= cfg.fid_min_samples else cfg.quick_ref_limit


# ---------------------------------------------------------------- features


def job_progress(enabled: bool, unit: str = "images"):
    from diffctl.console import JobProgress

    return JobProgress(enabled and process_rank() == 0, unit)


def extract(detector: Detector, batches, total: int, shape, desc: str, progress: bool):
    """Features (and logits) of uint8 NCHW batches, written into arrays of `total` rows allocated
    at the first batch (no list of batches concatenated at the end: one copy of the features)."""
    feats = logits = None
    done = 0
    with job_progress(progress) as bar:
        task = bar.add_task(desc, total=total)
        for x in batches:
            f, l = detector(x)
            if feats is None:
                feats = f.new_empty((total, f.shape[1]))
                logits = None if l is None else l.new_empty((total, l.shape[1]))
            feats[done : done + len(f)] = f
            if logits is not None:
                logits[done : done + len(l)] = l
            done += len(f)
            bar.advance(task, len(x))
    if feats is None:  # an empty shard still needs the feature width for the gather
        f, l = detector(torch.zeros((1, *shape), dtype=torch.uint8))
        return f[:0], None if l is None else l[:0]
    return feats[:done], logits if logits is None else logits[:done]


# ---------------------------------------------------------------- reference


@dataclass
class Reference:
    description: str
    mu: Tensor
    sigma: Tensor
    features: Tensor | None  # None for an mu/sigma-only .npz: no KID
    num_images: int | None
    path: Path | None = None  # cache file or .npz


@dataclass
class InMemory:
    """Reference images already in memory ([-1, 1] NCHW), e.g. the targets of an image-to-image run:
    embedded on each use (their statistics belong to this run alone), never cached."""

    description: str
    images: Tensor


def ref_source(cfg: DictConfig, data_cfg: DictConfig, split: str = "train", resolution=None, channels=None,
               num_samples: int | None = None):  # fmt: skip
    """An .npz path of statistics, or the arguments of the reference images (resolution/channels
    resolved; num_samples: the generated images it will score, which metrics.ref_limit=auto depends on)."""
    ref, name, root = cfg.ref, data_cfg.name, data_cfg.get("root")
    path = Path(str(ref)).expanduser() if ref is not None else None
    limit = ref_limit(cfg, num_samples)
    if path is not None and str(ref).endswith(".npz"):
        if not _holds_images(path):
            return path  # statistics; a missing or damaged file is reported by reference()
        return dict(name=NPZ_IMAGES, root=str(path.resolve()), split="samples", limit=limit)
    if path is not None and path.is_dir():  # a folder of images: read as data=imagefolder reads one
        name, root, split = "imagefolder", str(path.resolve()), "train"
    elif ref is not None:
        match = re.fullmatch(r"(\w+):(\w+)", str(ref))
        if not match:
            raise ConfigError(f"metrics.ref must be null, <dataset>:<split> (e.g. fashion_mnist:test), a folder of images "
                              f"or a .npz file (images or mu/sigma statistics), got {ref!r}")  # fmt: skip
        if match[1] != name:
            name, root = match[1], cfg.ref_root
        split = match[2]
    if split not in SPLITS:
        raise ConfigError(f"reference split must be one of {', '.join(SPLITS)}, got {split!r}")
    resolution = data_cfg.get("resolution") if resolution is None else resolution
    channels = data_cfg.get("channels") if channels is None else channels
    root, resolution, channels = check_dataset_options(name, root, resolution, channels, limit)
    return dict(name=name, root=root, split=split, resolution=resolution, channels=channels,
                download=bool(data_cfg.get("download", False)), limit=limit)  # fmt: skip


def _holds_images(path: Path) -> bool:
    """Whether an .npz holds images (`samples`, as samples.npz) rather than statistics (mu, sigma)."""
    if identify(path)[0] != "npz":
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return "samples.npy" in names and "mu.npy" not in names


def _describe(src: dict) -> str:
    limit = f", first {src['limit']}" if src["limit"] else ""
    if src["name"] == NPZ_IMAGES:
        return f"{src['root']} (images{limit})"
    if src["name"] == "imagefolder":
        return f"{src['root']} at {src['resolution']}px {src['channels']}ch{limit}"
    return f"{src['name']}:{src['split']} at {src['resolution']}px {src['channels']}ch{limit}"


def cache_path(cfg: DictConfig, src: dict, detector: Detector) -> Path:
    """Cache file of one reference set as seen by one detector (weights identified by their sha256)."""
    limit = f"first{src['limit']}" if src["limit"] else "all"
    if src["name"] == NPZ_IMAGES:  # an .npz is identified by its contents: a rewritten file is embedded again
        parts = [_CACHE_VERSION, NPZ_IMAGES, file_sha256(Path(src["root"]))[:16], limit, detector.name, detector.digest[:12]]
    else:
        parts = [_CACHE_VERSION, src["name"], src["split"], f"{src['resolution']}px", f"{src['channels']}ch",
                 limit, detector.name, detector.digest[:12]]  # fmt: skip
    if src["name"] == "imagefolder":  # a user folder is identified by where it is
        parts.insert(2, hashlib.sha256(str(Path(src["root"]).resolve()).encode()).hexdigest()[:10])
    return cache_dir(cfg) / "fid_refs" / ("-".join(parts) + ".npz")


_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)  # what a damaged archive raises


def _load_npz(path: Path, keys=("mu", "sigma"), name: str | None = None) -> dict:
    """The arrays of an .npz holding `keys`, identified first. `name`: how the file was given
    (e.g. metrics.ref=<path>), for messages."""
    name = name or str(path)
    kind, what = identify(path)
    if kind == "missing":
        raise ConfigError(f"reference file {name} does not exist")
    if kind != "npz":
        raise ConfigError(f"{name} is {what}, not a .npz archive with {' and '.join(keys)} arrays "
                          f"(`diffctl fid-stats` writes one: ref_stats.npz)")  # fmt: skip
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise ConfigError(f"{name} has no {', '.join(missing)} arrays (found: {', '.join(z.files)})")
            arrays = {k: z[k] for k in z.files}
    except _NPZ_ERRORS as err:
        raise ConfigError(f"{name} is a damaged .npz archive ({one_line(err)})") from None
    for k in keys:
        if arrays[k].dtype.kind not in "fiu":
            raise ConfigError(f"{name}: {k} holds {arrays[k].dtype} values, not numbers")
    return arrays


def _check_stats(mu, sigma, name: str) -> None:
    if mu.ndim != 1 or tuple(sigma.shape) != (len(mu), len(mu)):
        raise ConfigError(f"{name}: mu must be [D] and sigma [D, D], got {tuple(mu.shape)} and {tuple(sigma.shape)}")


def _from_npz(path: Path) -> Reference:
    z = _load_npz(path, name=f"metrics.ref={path}")
    for key in ("mu", "sigma"):  # NaN/inf statistics would make every FID NaN
        if not np.issubdtype(z[key].dtype, np.number) or not np.isfinite(z[key]).all():
            bad = "is not numeric" if not np.issubdtype(z[key].dtype, np.number) else f"has {int((~np.isfinite(z[key])).sum())} non-finite values (nan/inf)"
            raise ConfigError(f"{path}: the array {key} {bad}; a reference needs finite statistics (recompute them, e.g. with `diffctl fid-stats`)")
    mu, sigma = torch.from_numpy(z["mu"]).double(), torch.from_numpy(z["sigma"]).double()
    _check_stats(mu, sigma, f"metrics.ref={path}")
    return Reference(str(path), mu, sigma, None, None, path)


def _from_cache(path: Path, description: str) -> Reference | None:
    """The cached statistics, or None: not cached yet, or a cache entry that does not load (cut
    short, damaged, inconsistent), which is then recomputed and replaced (with a note naming it)."""
    if not path.exists():
        return None
    try:
        z = _load_npz(path, keys=("features", "mu", "sigma"), name=f"cache {path}")
        feats = torch.from_numpy(z["features"])
        mu, sigma = torch.from_numpy(z["mu"]), torch.from_numpy(z["sigma"])
        _check_stats(mu, sigma, f"cache {path}")
        if feats.ndim != 2 or feats.shape[1] != len(mu) or len(feats) < 1:
            raise ConfigError(f"cache {path}: features are {tuple(feats.shape)}, statistics {len(mu)}-dim")
    except ConfigError as err:
        print(f"note: reference statistics: unusable cache entry ({err}); recomputing and replacing it")
        return None
    print(f"reference statistics: cached {path}")
    return Reference(description, mu, sigma, feats, len(feats), path)


def _save_cache(path: Path, ref: Reference) -> None:
    # a file object: np.savez would otherwise append .npz to the name; atomic: readers see the old
    # entry or the complete new one, and a killed run leaves no torn cache file behind
    arrays = dict(features=ref.features.numpy(), mu=ref.mu.numpy(), sigma=ref.sigma.numpy())
    atomic_write(path, lambda f: np.savez(f, **arrays))


def reference(cfg: DictConfig, src, detector: Detector, device: torch.device, progress: bool = True) -> Reference | None:
    """Reference statistics from an .npz, the cache, or one pass over the dataset (then cached).

    Collective under torch.distributed: on a cache miss each rank embeds a contiguous shard of
    the dataset. Returns the Reference on rank 0 (and on every rank after a miss), None elsewhere.
    """
    if isinstance(src, Path):
        return on_rank0(lambda: _from_npz(src), device)
    if isinstance(src, InMemory):
        path, description = None, src.description
        dataset, shape = [{IMAGE: x} for x in src.images], tuple(src.images.shape[1:])
    else:
        path, description = cache_path(cfg, src, detector), _describe(src)
        ref = on_rank0(lambda: _from_cache(path, description), device)
        if broadcast(ref is not None, device):
            return ref
        dataset, shape = _images(src)
    n, rank = len(dataset), process_rank()
    world = dist.get_world_size() if distributed() else 1
    shard = torch.utils.data.Subset(dataset, range(rank * n // world, (rank + 1) * n // world))
    loader = torch.utils.data.DataLoader(shard, batch_size=cfg.batch_size)
    if rank == 0 and path is not None:
        print(f"computing reference statistics for {description} ({n} images) with the {detector.name} detector; "
              f"cached for later runs in {path}")  # fmt: skip
    batches = (to_uint8(batch[IMAGE]).permute(0, 3, 1, 2) for batch in loader)  # the same conversion as generated samples
    feats, _ = extract(detector, batches, len(shard), shape, "reference features", progress)
    feats = gather_rows(feats, device)
    ref = Reference(description, *feature_stats(feats), feats, n, path)
    if rank == 0 and path is not None:
        _save_cache(path, ref)
        print(f"reference statistics: saved {path}")
    return ref




def _images(src: dict):
    """The reference images as a dataset of {IMAGE: [-1, 1] CHW} items, and their shape (C, H, W)."""
    if src["name"] != NPZ_IMAGES:
        return build_dataset(**src, random_flip=False), (src["channels"], src["resolution"], src["resolution"])
    from diffctl.image_sources import read_images

    images = read_images(src["root"], limit=src["limit"]).images
    return [{IMAGE: x} for x in images], tuple(images.shape[1:])
