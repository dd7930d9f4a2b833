"""The one place where a network output becomes x0 / eps / score predictions.

A `Denoiser` wraps a backbone (U-Net, DiT) with an SDE: it scales the network input, turns
diffusion time into the network's noise label, and converts the raw output according to the
`prediction` type. Objectives and samplers only ever see `Prediction(x0, eps)` and `score`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffctl.sde import SDE, _bcast

PREDICTIONS = ("eps", "x0", "v", "score", "consistency")


@dataclass
class Prediction:
    x0: Tensor
    eps: Tensor
    sigma: Tensor  # broadcastable marginal std at t, kept for the score

    @property
    def score(self) -> Tensor:
        """grad_x log p_t(x) = -eps / sigma for the Gaussian kernel x = alpha x0 + sigma eps."""
        return -self.eps / self.sigma


def split_prediction(kind: str, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a network output `out` of the given kind, using x = alpha*x0 + sigma*eps.

    alpha and sigma must already broadcast against x. v is alpha*eps - sigma*x0 (Salimans & Ho),
    written without assuming alpha^2 + sigma^2 = 1 so it is also defined for VE and sub-VP.
    """
    if kind == "eps":
        return (x - sigma * out) / alpha, out
    if kind in ("x0", "consistency"):
        return out, (x - alpha * out) / sigma
    if kind == "v":
        norm = alpha * alpha + sigma * sigma
        return (alpha * x - sigma * out) / norm, (sigma * x + alpha * out) / norm
    if kind == "score":
        eps = -sigma * out
        return (x - sigma * eps) / alpha, eps
    raise ValueError(f"unknown prediction type {kind!r}; choose one of {', '.join(PREDICTIONS)}")


class Denoiser(nn.Module):
    """Backbone + SDE + parameterization.

    - input scaling: with `scale_input`, x_t is divided by its marginal std sqrt(alpha^2 sigma_data^2
      + sigma^2) so the network sees unit-variance inputs for every SDE (essential for VE, whose
      sigma_max is tens; EDM's c_in). Off reproduces DDPM/score_sde, which feed x_t unscaled.
    - noise label: 1000 * t for every SDE (t is log-sigma-like for VE and DDPM's step index for VP).
    - `score`: the network output divided by sigma is the score (NCSN's noise-conditional scaling).
    - `consistency`: f(x, t) = c_skip * x/alpha + c_out * F in the variables y = x/alpha, s = sigma/alpha
      (a VE process), so f(x_eps, eps) = x_eps/alpha(eps) exactly; for VE that is x_eps (Song et al. 2023).
    """

    def __init__(
        self,
        net: nn.Module,
        sde: SDE,
        prediction: str = "eps",
        sigma_data: float = 0.5,
        scale_input: bool = True,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.net = net
        self.sde = sde
        self.prediction = prediction
        self.sigma_data = float(sigma_data)
        self.scale_input = bool(scale_input)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0))

    def raw(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Network output F for x_t at times t [B] (no conversion)."""
        alpha, sigma = _bcast(self.sde.alpha(t), x), _bcast(self.sde.sigma(t), x)
        if self.scale_input:
            x = x / torch.sqrt(alpha * alpha * self.sigma_data**2 + sigma * sigma)
        return self.net(x, 1000.0 * t, labels)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Prediction:
        t = t.to(x.dtype) if t.is_floating_point() else t.float()
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.raw(x, t, labels).to(x.dtype)
        alpha, sigma = _bcast(self.sde.alpha(t), x), _bcast(self.sde.sigma(t), x)
        if self.prediction == "score":
            out = out / sigma
        elif self.prediction == "consistency":
            out = self._consistency_output(x, t, out, alpha)
        x0, eps = split_prediction(self.prediction, out, x, alpha, sigma)
        return Prediction(x0=x0, eps=eps, sigma=sigma)

    def consistency_scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """c_skip(t), c_out(t) of the consistency parameterization in noise-ratio units."""
        s = self.sde.noise_ratio(t)
        s_min = self.sde.noise_ratio(torch.full_like(t, self.sde.eps))
        sd2 = self.sigma_data**2
        c_skip = sd2 / ((s - s_min) ** 2 + sd2)
        c_out = self.sigma_data * (s - s_min) / torch.sqrt(sd2 + s * s)
        return c_skip, c_out

    def _consistency_output(self, x: Tensor, t: Tensor, out: Tensor, alpha: Tensor) -> Tensor:
        c_skip, c_out = self.consistency_scalings(t)
        return _bcast(c_skip, x) * (x / alpha) + _bcast(c_out, x) * out


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) around a conditional denoiser.

    D_w = D_null + w (D_label - D_null), applied to x0 and eps alike (the weights sum to one, so
    x = alpha x0 + sigma eps still holds). w = 1 is the plain conditional model, w = 0 the
    unconditional one, w > 1 strengthens the condition (the `cfg_scale` of DiT and diffusers).
    Both halves run as one doubled batch, so one call is one network evaluation.
    """

    def __init__(self, denoiser: Denoiser, scale: float):
        super().__init__()
        self.denoiser = denoiser
        self.scale = float(scale)

    @property
    def sde(self) -> SDE:
        return self.denoiser.sde

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Prediction:
        null = torch.full_like(labels, self.denoiser.num_classes)  # the networks' null-class row
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        both = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        (x0_c, x0_u), (eps_c, eps_u) = both.x0.chunk(2), both.eps.chunk(2)
        w = self.scale
        return Prediction(x0=x0_u + w * (x0_c - x0_u), eps=eps_u + w * (eps_c - eps_u), sigma=both.sigma[: x.shape[0]])


class ClippedDenoiser(nn.Module):
    """Clip the x0 prediction to the data range and make eps agree with it (DDPM's clip_denoised,
    diffusers' clip_sample). The true E[x0 | x_t] of data in [lo, hi] lies in that range, so the
    clip can only move a prediction closer; it keeps deterministic samplers stable when the
    network is still poor at high noise, where x0 = (x - sigma eps)/alpha amplifies eps errors."""

    def __init__(self, denoiser: nn.Module, lo: float = -1.0, hi: float = 1.0):
        super().__init__()
        self.denoiser, self.lo, self.hi = denoiser, lo, hi

    @property
    def sde(self) -> SDE:
        return self.denoiser.sde

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Prediction:
        pred = self.denoiser(x, t, labels)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        alpha = _bcast(self.sde.alpha(t.to(x.dtype)), x)
        x0, eps = split_prediction("x0", pred.x0.clamp(self.lo, self.hi), x, alpha, pred.sigma)
        return Prediction(x0=x0, eps=eps, sigma=pred.sigma)
