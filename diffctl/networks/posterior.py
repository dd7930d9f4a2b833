"""The KL autoencoder's posterior q(z | x): a diagonal Gaussian per latent element (LDM's
DiagonalGaussianDistribution, Rombach et al. 2022, which diffusers' AutoencoderKL also returns).

The encoder's output holds the mean and the log-variance stacked on the channel dimension. The
log-variance is clamped to [-30, 20] as LDM does, so that exp() neither underflows to a zero standard
deviation nor overflows while an untrained encoder's outputs are still wild; kl() and nll() use the
clamped value, as LDM's do, so they stay consistent with std and sample().
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents [N, C, H, W]; statistics are per sample (summed over C, H, W)."""

    def __init__(self, moments: Tensor):
        """moments: [N, 2C, H, W], the mean's C channels then the log-variance's C channels."""
        if moments.ndim < 2 or moments.shape[1] % 2:
            raise ValueError(f"posterior moments need an even channel count (mean and log-variance), got shape {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def sample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """A reparameterized draw mean + std * noise (gradients flow to mean and logvar); noise is drawn
        from `generator` (a torch.Generator on the posterior's device) unless given."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)} for a posterior of shape {tuple(self.mean.shape)}")
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) per sample [N], summed over the latent dimensions; other=None is N(0, I)."""
        if other is None:
            terms = self.mean.square() + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean).square() / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.flatten(1).sum(1)

    def nll(self, z: Tensor) -> Tensor:
        """-log q(z | x) per sample [N] (nats), summed over the latent dimensions."""
        terms = math.log(2.0 * math.pi) + self.logvar + (z - self.mean).square() / self.var
        return 0.5 * terms.flatten(1).sum(1)
