"""Distances between a set of samples and a known distribution: how `model=gmm` runs, the sampler
tests and scripts/bench_samplers.py score samplers against the exact answer."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def random_directions(dim: int, num: int, seed: int = 0) -> Tensor:
    """`num` unit vectors in R^dim, uniform on the sphere (float64), reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(num, dim, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def sliced_wasserstein(a: Tensor, b: Tensor, directions: Tensor) -> Tensor:
    """Sliced Wasserstein-2 distance between two equally sized sample sets [N, ...]: the root mean
    over `directions` of the 1-D W2^2, which for equal sizes pairs the sorted projections."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equally sized sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    pa, _ = (a @ directions.T).sort(0)
    pb, _ = (b @ directions.T).sort(0)
    return (pa - pb).pow(2).mean().sqrt()


def mixture_report(samples: Tensor, mixture, seed: int = 0, projections: int = 256) -> dict[str, float]:
    """How far `samples` are from `mixture` (a GaussianMixture):
    - sw2: sliced W2 to as many exact samples; sw2_floor: the median of the same between pairs of
      exact sets, what a perfect sampler gets at this sample size (SW2 is noisy: for multi-modal data
      the mode proportions of a finite set dominate it, and single draws vary by a factor of ~3);
    - mean_error: |sample mean - mean|; cov_error: |sample cov - cov|_F / |cov|_F;
    - weights_tv: total variation between the mixture weights and the mean posterior component
      probabilities p(k | x) of the samples (whose expectation under exact samples is the weights).
    """
    x = samples.reshape(samples.shape[0], -1).double().cpu()
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    exact = mixture.sample(n, g)[0].reshape(n, -1)
    dirs = random_directions(x.shape[1], projections, seed)
    floors = [sliced_wasserstein(mixture.sample(n, g)[0], mixture.sample(n, g)[0], dirs) for _ in range(5)]
    cov = mixture.covariance()
    report = {
        "sw2": float(sliced_wasserstein(x, exact, dirs)),
        "sw2_floor": float(torch.stack(floors).median()),
        "mean_error": float((x.mean(0) - mixture.mean()).norm()),
        "cov_error": float((torch.cov(x.T).reshape(cov.shape) - cov).norm() / cov.norm()) if n > 1 else math.nan,
        "weights_tv": float(0.5 * (mixture.responsibilities(x).mean(0) - mixture.weights).abs().sum()),
    }
    return report
