"""The exact conditional of a Gaussian mixture given some of its coordinates: the ground truth of
inpainting for model=gmm.

For p(x) = sum_k w_k N(x; mu_k, Sigma_k) and x split into known coordinates k and unknown u,
    p(x_u | x_k) = sum_k w'_k N(x_u; m_k, C_k),
    w'_k ∝ w_k N(x_k; mu_k,k, Sigma_k,kk)                        (each component's marginal likelihood),
    m_k = mu_k,u + Sigma_k,uk Sigma_k,kk^-1 (x_k - mu_k,k),     C_k = Sigma_k,uu - Sigma_k,uk Sigma_k,kk^-1 Sigma_k,ku
(the Schur complement). For diagonal covariances Sigma_k,uk = 0: m_k = mu_k,u, C_k = Sigma_k,uu and only
the weights change. Everything in float64, through Cholesky factors (no explicit inverse).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffctl.errors import ConfigError
from diffctl.networks.gmm import GaussianMixture


def _split(mixture: GaussianMixture, known: Tensor) -> tuple[Tensor, Tensor]:
    known = torch.as_tensor(known).reshape(-1).to(torch.bool).cpu()
    if known.numel() != mixture.dim:
        raise ConfigError(f"the known-coordinates mask has {known.numel()} entries, the mixture D={mixture.dim}")
    k_idx, u_idx = known.nonzero().reshape(-1), (~known).nonzero().reshape(-1)
    if len(u_idx) == 0:
        raise ConfigError("every coordinate is known: there is nothing to condition on to inpaint")
    return k_idx, u_idx


def conditional(mixture: GaussianMixture, known: Tensor, x: Tensor) -> GaussianMixture:
    """p(x_u | x_k) as a GaussianMixture over the unknown coordinates (in their order in the
    flattened sample). known: [D] (or the sample's shape) booleans, True = known; x: one sample
    (only its known coordinates are read). No known coordinate: the mixture itself, flattened."""
    k_idx, u_idx = _split(mixture, known)
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1).cpu()
    mu = mixture.means.cpu()
    mu_k, mu_u, xk = mu[:, k_idx], mu[:, u_idx], x[k_idx]
    log_w = mixture.log_weights.cpu().clone()
    if mixture.basis is None:  # diagonal: unknown coordinates independent of the known within a component
        var = mixture.variances.cpu()
        vk = var[:, k_idx]
        log_w = log_w - 0.5 * ((xk - mu_k) ** 2 / vk + torch.log(2 * math.pi * vk)).sum(1)
        out = GaussianMixture(mu_u, scales=var[:, u_idx].sqrt())
    else:
        cov = mixture.covariances().cpu()
        means, covs = [], []
        for c in range(mixture.num_components):
            if len(k_idx) == 0:
                means.append(mu_u[c])
                covs.append(cov[c])
                continue
            s_kk = cov[c][k_idx][:, k_idx]
            s_uk = cov[c][u_idx][:, k_idx]
            L = torch.linalg.cholesky(s_kk)
            d = (xk - mu_k[c])[:, None]
            a = torch.cholesky_solve(d, L)  # Sigma_kk^-1 (x_k - mu_k)
            b = torch.cholesky_solve(s_uk.T, L)  # Sigma_kk^-1 Sigma_ku
            means.append(mu_u[c] + (s_uk @ a).reshape(-1))
            c_uu = cov[c][u_idx][:, u_idx] - s_uk @ b
            covs.append((c_uu + c_uu.T) / 2)  # symmetric to the last bit, as GaussianMixture checks
            half_logdet = torch.log(torch.diagonal(L)).sum()
            maha = float((d * a).sum())
            log_w[c] = log_w[c] - 0.5 * maha - half_logdet - 0.5 * len(k_idx) * math.log(2 * math.pi)
        out = GaussianMixture(torch.stack(means), covariances=torch.stack(covs))
    # Set as logs: a far component's weight can underflow to 0 as a number, which GaussianMixture's
    # weights= refuses; its log stays finite.
    out.log_weights = log_w - torch.logsumexp(log_w, 0)
    return out


def conditional_moments(mixture: GaussianMixture, known: Tensor, x: Tensor) -> dict[str, Tensor]:
    """Mean [U], covariance [U, U] and component weights [K] of p(x_u | x_k) (see `conditional`)."""
    cond = conditional(mixture, known, x)
    return {"mean": cond.mean(), "covariance": cond.covariance(), "weights": cond.weights}
