"""The image-metric formulas on detector features: Fréchet distance, KID, Inception Score, and the
improved precision and recall of Kynkäänniemi et al. (2019).

They follow torch-fidelity's conventions (tested against it): Fréchet distance of float64
means/covariances (ddof 1); KID = unbiased MMD² with the cubic polynomial kernel
(x·y/d + 1)³ averaged over random subsets; IS = exp(E KL(p(y|x) ‖ p(y))) per split after a
seeded shuffle. Standard deviations are over subsets/splits with ddof 0. Random draws use
numpy's RandomState(seed) in torch-fidelity's order, so the same seed gives the same numbers.
Precision/recall: each set's manifold is the union of balls around its points with radius the
distance to the k-th nearest other point of the set; precision is the fraction of generated
points inside the reference manifold, recall the fraction of reference points inside the generated
one (ties count as inside, as torch-fidelity's `prc`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def feature_stats(feats: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Mean and covariance (ddof 1) in float64, two passes over row chunks: sum (x - mean)(x - mean)^T
    without a float64 copy of all features (50,000 x 2048 would be 0.8 GB, twice over in torch.cov)."""
    n, d = feats.shape
    chunks = [feats[i : i + chunk] for i in range(0, n, chunk)]
    mu = sum(c.double().sum(0) for c in chunks) / n
    cov = torch.zeros(d, d, dtype=torch.float64)
    for c in chunks:
        centered = c.double() - mu
        cov.addmm_(centered.T, centered)
    return mu, cov / (n - 1)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """|mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½).

    tr (S1 S2)^½ is the sum of square roots of the eigenvalues of S1 S2, which are real and >= 0
    (S1 S2 is similar to the PSD S1^½ S2 S1^½); rounding leaves tiny imaginary parts, dropped.
    """
    mu1, mu2, sigma1, sigma2 = (t.double().cpu() for t in (mu1, mu2, sigma1, sigma2))
    diff = mu1 - mu2
    tr_sqrt = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt)


def _mmd2_poly(x: Tensor, y: Tensor) -> float:
    d, m = x.shape[1], x.shape[0]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    # Unbiased: same-set sums skip the diagonal (k(x, x)); the cross term keeps all m² pairs.
    same = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(same - 2 * kxy.sum() / m**2)


def kernel_inception_distance(gen: Tensor, ref: Tensor, subsets: int, subset_size: int, seed: int, progress=None):
    """(mean, std) of the MMD² over `subsets` draws of subset_size rows from each set, without replacement."""
    rng = np.random.RandomState(seed)
    gen, ref = gen.double(), ref.double()
    values = []
    task = progress.add_task("KID subsets", total=subsets) if progress else None
    for _ in range(subsets):
        x = gen[torch.from_numpy(rng.choice(len(gen), subset_size, replace=False))]
        y = ref[torch.from_numpy(rng.choice(len(ref), subset_size, replace=False))]
        values.append(_mmd2_poly(x, y))
        if progress:
            progress.advance(task)
    return float(np.mean(values)), float(np.std(values))


def inception_score(logits: Tensor, splits: int, seed: int) -> tuple[float, float]:
    """(mean, std) over splits of exp(mean_x KL(p(y|x) ‖ p(y))), p(y) the split's mean prediction."""
    n = len(logits)
    # Shuffled first so that ordered samples (e.g. class-sorted) do not make splits unlike each other.
    log_p = torch.log_softmax(logits.double()[torch.from_numpy(np.random.RandomState(seed).permutation(n))], dim=1)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits : (i + 1) * n // splits]
        log_py = chunk.exp().mean(0).log()
        scores.append(float((chunk.exp() * (chunk - log_py)).sum(1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_distance(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row (the row itself is the 0th)."""
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])


def _inside(points: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """Whether each point lies in some ball (centre, radius), without the full distance matrix."""
    return torch.cat([(torch.cdist(c, centres) <= radii).any(1) for c in points.split(chunk)])


def precision_recall(gen: Tensor, ref: Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """(precision, recall) of generated features against reference features (Kynkäänniemi et al.
    2019, k = 3 as the paper), in row chunks so memory stays at chunk x max(n_gen, n_ref) distances."""
    if min(len(gen), len(ref)) <= k:
        raise ValueError(f"precision/recall with k={k} neighbours needs more than {k} images in each set")
    gen, ref = gen.float(), ref.float()
    precision = _inside(gen, ref, _kth_neighbour_distance(ref, k, chunk), chunk).double().mean()
    recall = _inside(ref, gen, _kth_neighbour_distance(gen, k, chunk), chunk).double().mean()
    return float(precision), float(recall)
