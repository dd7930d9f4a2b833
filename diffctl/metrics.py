"""FID, KID, Inception Score and precision/recall of generated images against a reference set, on one process or many:
the detector's features, the reference's statistics (computed once and cached) and the scores.
The formulas are in diffctl/metric_formulas.py, the reference set and its cache in diffctl/references.py,
the collectives in diffctl/collectives.py.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor

from diffctl.collectives import broadcast, gather_rows, on_rank0
from diffctl.detectors import Detector, MetricsUnavailable, load_detector, load_detector_named
from diffctl.errors import ConfigError
from diffctl.metric_formulas import feature_stats, frechet_distance, inception_score, kernel_inception_distance, precision_recall
from diffctl.references import InMemory, Reference, cache_path, extract, job_progress, ref_limit, ref_source, reference

__all__ = ["MetricsUnavailable", "evaluate", "check_config", "reference", "ref_source", "load_detector", "cache_path",
           "ref_limit", "extract", "InMemory", "Reference", "feature_stats", "frechet_distance"]  # fmt: skip


# ---------------------------------------------------------------- config


def check_config(cfg: DictConfig) -> list[str]:
    """Validate the metrics node without touching weights or data (the schema's metrics.* rules,
    diffctl/schema/keys.py); returns the requested metric names."""
    from diffctl.schema import validate_group

    validate_group(cfg, "sample", "metrics")
    return list(cfg.names or [])


# ---------------------------------------------------------------- evaluate


def _compute(names, feats: Tensor, logits: Tensor | None, ref: Reference | None, cfg, detector: Detector) -> dict:
    n, notes, out = len(feats), [], {}
    if ref is not None and ref.mu.shape[0] != feats.shape[1]:
        raise ConfigError(f"reference {ref.description} has {ref.mu.shape[0]}-dim statistics, "
                          f"the {detector.name} detector gives {feats.shape[1]}-dim features")  # fmt: skip
    if "fid" in names:
        if n < 2:
            raise ConfigError("FID needs at least 2 images")
        out["fid"] = None
        if n < cfg.fid_min_samples:  # not computed: a number that small samples bias this much misleads
            notes.append(f"FID withheld: {n} samples < metrics.fid_min_samples={cfg.fid_min_samples} (FID is biased upward "
                         f"at small N, KID is not: compare KID, or sample more, or lower metrics.fid_min_samples)")  # fmt: skip
        else:
            out["fid"] = frechet_distance(*feature_stats(feats), ref.mu, ref.sigma)
            if n <= feats.shape[1]:  # the sample covariance is singular: rank <= n - 1 < feature dimension
                out["fid_small_n"] = True
                notes.append(f"FID from {n} samples (<= {feats.shape[1]} feature dimensions) is biased upward: "
                             f"compare it only with FIDs from the same number of samples")  # fmt: skip
    if "kid" in names:
        out["kid_mean"] = out["kid_std"] = None
        if ref.features is None:
            notes.append(f"KID needs reference features; {ref.description} holds only mu/sigma")
        else:
            m = min(cfg.kid_subset_size, n, len(ref.features))
            if m < 2:
                raise ConfigError("KID needs at least 2 images")
            if m < cfg.kid_subset_size:
                notes.append(f"KID subsets of {m} images (metrics.kid_subset_size={cfg.kid_subset_size} > image count)")
            with job_progress(cfg.progress_bar, "subsets") as bar:
                kid = kernel_inception_distance(feats, ref.features, cfg.kid_subsets, m, cfg.seed, bar)
            out["kid_mean"], out["kid_std"] = kid
    if "pr" in names:
        out["pr_precision"] = out["pr_recall"] = None
        if ref.features is None:
            notes.append(f"precision/recall need reference features; {ref.description} holds only mu/sigma")
        else:
            out["pr_precision"], out["pr_recall"] = precision_recall(feats, ref.features, cfg.pr_neighbours)
    if "is" in names:
        out["is_mean"] = out["is_std"] = None
        if logits is None:
            notes.append(f"IS needs the Inception classifier logits, which the {detector.name} detector does not have "
                         f"(metrics.detector=inception with metrics.inception_weights= gives them)")  # fmt: skip
        else:
            splits = min(cfg.is_splits, n)
            if splits < cfg.is_splits:
                notes.append(f"IS over {splits} splits (metrics.is_splits={cfg.is_splits} > image count)")
            out["is_mean"], out["is_std"] = inception_score(logits, splits, cfg.seed)
    out.update(detector=detector.name, num_images=n)
    if ref is not None:
        out.update(ref=ref.description, ref_num_images=ref.num_images)
    if notes:
        out["notes"] = "; ".join(notes)
    return out


def evaluate(images: Tensor, cfg: DictConfig, data_cfg: DictConfig, device: torch.device, detector: Detector | None = None,
             ref: InMemory | None = None) -> dict:  # fmt: skip
    """Metrics cfg.names of uint8 [n, C, H, W] images (C = 1 or 3) against the reference set.

    Under an initialized process group each rank passes its own shard; concatenated in rank order
    the shards must be the whole set in sample order (contiguous blocks), since KID subsets and IS
    splits are drawn by index. Every rank returns the same dict, equal to one process's on all
    images. Raises MetricsUnavailable when no detector weights can be had. `detector`: one the
    caller already loaded (one process; `diffctl metrics` tried it on the images first). `ref`:
    reference images in memory (an image-to-image run's targets) instead of metrics.ref.
    """
    names = check_config(cfg)
    if not names:
        return {}
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"metrics need uint8 [n, 1|3, H, W] images, got {images.dtype} {tuple(images.shape)}")
    if detector is None:
        detector = on_rank0(lambda: load_detector(cfg, device), device)
        name = broadcast(detector and detector.name, device)
        if detector is None:  # other ranks: rank 0's choice (auto), after it fetched any missing files
            detector = load_detector_named(name, cfg, device)
    batches = (images[i : i + cfg.batch_size] for i in range(0, len(images), cfg.batch_size))
    feats, logits = extract(detector, batches, len(images), images.shape[1:], "sample features", cfg.progress_bar)
    feats, logits = gather_rows(feats, device), gather_rows(logits, device)
    stats, n = None, len(feats)
    if "kid" in names or "pr" in names or ("fid" in names and n >= cfg.fid_min_samples):  # a withheld FID needs no reference
        src = ref or ref_source(cfg, data_cfg, resolution=images.shape[2], channels=images.shape[1], num_samples=n)
        stats = reference(cfg, src, detector, device, cfg.progress_bar)
    return broadcast(on_rank0(lambda: _compute(names, feats, logits, stats, cfg, detector), device), device)
