"""How a network output becomes predictions: one small object per parameterization.

Every model speaks in x_t = alpha(t) x0 + sigma(t) eps. A parameterization says how the network
sees x_t and t (c_in, c_noise) and how its raw output F becomes the pair (x0, eps): for EDM-style
preconditioning (Karras et al. 2022, and sgm's DenoiserScaling) x0 = c_skip x + c_out F. The
objects expose those four scalings; `predict` computes (x0, eps) with each kind's own formula,
written as diffctl always computed it (the golden outputs of tests/test_golden.py pin them bitwise),
which equals c_skip x + c_out F up to rounding (tests/test_denoiser_objectives.py checks both).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from diffctl.sde import SDE, broadcast


@dataclass
class Prediction:
    """What every sampler and objective reads: the x0 and eps predictions at x_t (and sigma(t))."""

    x0: Tensor
    eps: Tensor
    sigma: Tensor  # broadcastable marginal std at t, kept for the score

    @property
    def score(self) -> Tensor:
        """grad_x log p_t(x) = -eps / sigma for the Gaussian kernel x = alpha x0 + sigma eps."""
        return -self.eps / self.sigma


def split(kind: str, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, eps) from an output `out` that predicts `kind` (eps | x0 | v | score), using x = alpha x0 + sigma eps.

    alpha and sigma must broadcast against x. v is alpha eps - sigma x0 (Salimans & Ho), written without
    assuming alpha^2 + sigma^2 = 1 so it is also defined for VE and sub-VP. score here is already the
    score (the network output divided by sigma)."""
    if kind == "eps":
        return (x - sigma * out) / alpha, out
    if kind == "x0":
        return out, (x - alpha * out) / sigma
    if kind == "v":
        norm = alpha * alpha + sigma * sigma
        return (alpha * x - sigma * out) / norm, (sigma * x + alpha * out) / norm
    if kind == "score":
        eps = -sigma * out
        return (x - sigma * eps) / alpha, eps
    raise ValueError(f"unknown prediction type {kind!r}; choose one of eps, x0, v, score")


def rates(sde: SDE, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha'(t), sigma'(t)) broadcast against `like`, in its dtype."""
    return broadcast(sde.alpha_dot(t), like).to(like.dtype), broadcast(sde.sigma_dot(t), like).to(like.dtype)


def velocity(sde: SDE, t: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """d x_t / dt along the path x_t = alpha x0 + sigma eps with (x0, eps) held: alpha' x0 + sigma' eps
    (eps - x0 on the linear path). The one place diffctl computes a velocity from a prediction: the
    flow objective's target and its prediction, and the flow parameterization's output, are this."""
    alpha_dot, sigma_dot = rates(sde, t, x0)
    return alpha_dot * x0 + sigma_dot * eps


def split_velocity(u: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, alpha_dot: Tensor, sigma_dot: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, eps) from x = alpha x0 + sigma eps and u = alpha' x0 + sigma' eps: the 2 x 2 system's
    solution, with det = alpha sigma' - sigma alpha' (> 0 on every SDE here; 1 on the linear path,
    where x0 = x - t u and eps = x + (1 - t) u)."""
    det = alpha * sigma_dot - sigma * alpha_dot
    return (sigma_dot * x - sigma * u) / det, (alpha * u - alpha_dot * x) / det


class NetworkInputs:
    """How a network sees x_t and t: input scaling (c_in) and noise label (c_noise), shared by every
    parameterization and by noisy classifiers (which predict no x0, so have no c_skip/c_out).

    scale_input: x_t is divided by its marginal std sqrt(alpha^2 sigma_data^2 + sigma^2) so the network
    sees unit-variance inputs for every SDE (essential for VE, whose sigma_max is tens; EDM's c_in).
    Off reproduces DDPM/score_sde, which feed x_t unscaled. c_noise = 1000 t for every SDE (t is
    log-sigma-like for VE and DDPM's step index for VP)."""

    def __init__(self, sde: SDE, sigma_data: float = 0.5, scale_input: bool = True):
        self.sde, self.sigma_data, self.scale_input = sde, float(sigma_data), bool(scale_input)

    def c_in(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        if not self.scale_input:
            return torch.ones_like(sigma)
        return 1.0 / torch.sqrt(alpha * alpha * self.sigma_data**2 + sigma * sigma)

    def network_input(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """c_in x, as a division (the arithmetic the golden outputs pin)."""
        return x / torch.sqrt(alpha * alpha * self.sigma_data**2 + sigma * sigma) if self.scale_input else x

    def c_noise(self, t: Tensor) -> Tensor:
        return 1000.0 * t


class Parameterization(NetworkInputs, ABC):
    """Base of the kinds: NetworkInputs plus how the raw output F becomes (x0, eps)."""

    name = ""
    one_step = False  # a consistency function: maps any x_t straight to x0, has no PF-ODE of its own

    @abstractmethod
    def c_skip_out(self, t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out) with x0 = c_skip x_t + c_out F (each kind has its own)."""

    def predict(self, out: Tensor, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) from the network output; alpha and sigma broadcast against x, t is [B]."""
        return split(self.name, out, x, alpha, sigma)


class EpsParameterization(Parameterization):
    """The network predicts the noise (DDPM): x0 = (x - sigma F) / alpha."""

    name = "eps"

    def c_skip_out(self, t, alpha, sigma):
        return 1.0 / alpha, -sigma / alpha


class X0Parameterization(Parameterization):
    """The network predicts the clean data."""

    name = "x0"

    def c_skip_out(self, t, alpha, sigma):
        return torch.zeros_like(alpha), torch.ones_like(alpha)


class VParameterization(Parameterization):
    """The network predicts v = alpha eps - sigma x0 (Salimans & Ho 2022)."""

    name = "v"

    def c_skip_out(self, t, alpha, sigma):
        norm = alpha * alpha + sigma * sigma
        return alpha / norm, -sigma / norm


class ScoreParameterization(Parameterization):
    """The network output divided by sigma is the score (NCSN's noise-conditional scaling)."""

    name = "score"

    def c_skip_out(self, t, alpha, sigma):
        return 1.0 / alpha, sigma / alpha  # score = F / sigma, so eps = -sigma score = -F

    def predict(self, out, x, t, alpha, sigma):
        return split("score", out / sigma, x, alpha, sigma)


class FlowParameterization(Parameterization):
    """The network predicts the velocity u = alpha' x0 + sigma' eps (flow matching; eps - x0 on the
    linear path, Lipman et al. 2023 / Liu et al. 2023); defined on every SDE, whose det is > 0."""

    name = "flow"

    def c_skip_out(self, t, alpha, sigma):
        alpha_dot, sigma_dot = rates(self.sde, t, alpha)
        det = alpha * sigma_dot - sigma * alpha_dot
        return sigma_dot / det, -sigma / det

    def predict(self, out, x, t, alpha, sigma):
        return split_velocity(out, x, alpha, sigma, *rates(self.sde, t, x))


class ConsistencyParameterization(Parameterization):
    """f(x, t) = c_skip x/alpha + c_out F in the variables y = x/alpha, s = sigma/alpha (a VE process),
    with c_skip(s_min) = 1 and c_out(s_min) = 0, so f(x_eps, eps) = x_eps/alpha(eps) exactly; for VE
    that is x_eps (Song et al. 2023)."""

    name = "consistency"
    one_step = True

    def ratio_scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """c_skip(t), c_out(t) in noise-ratio units (applied to y = x/alpha)."""
        s = self.sde.noise_ratio(t)
        s_min = self.sde.noise_ratio(torch.full_like(t, self.sde.eps))
        sd2 = self.sigma_data**2
        c_skip = sd2 / ((s - s_min) ** 2 + sd2)
        c_out = self.sigma_data * (s - s_min) / torch.sqrt(sd2 + s * s)
        return c_skip, c_out

    def c_skip_out(self, t, alpha, sigma):
        c_skip, c_out = self.ratio_scalings(t)
        return broadcast(c_skip, alpha) / alpha, broadcast(c_out, alpha)

    def predict(self, out, x, t, alpha, sigma):
        c_skip, c_out = self.ratio_scalings(t)
        x0 = broadcast(c_skip, x) * (x / alpha) + broadcast(c_out, x) * out
        return split("x0", x0, x, alpha, sigma)


class EDMParameterization(Parameterization):
    """EDM's preconditioning (Karras et al. 2022, Table 1) in the VE variables y = x/alpha, s = sigma/alpha,
    where every SDE here is y = x0 + s eps and s is EDM's sigma:
        D(y; s) = c_skip(s) y + c_out(s) F(c_in(s) y, c_noise(s)),
        c_skip = sd^2/(s^2 + sd^2), c_out = s sd/sqrt(s^2 + sd^2), c_in = 1/sqrt(s^2 + sd^2), c_noise = ln(s)/4.
    c_in is NetworkInputs' (x/sqrt(alpha^2 sd^2 + sigma^2) = y/sqrt(s^2 + sd^2); denoiser.scale_input=false
    turns it off as for every kind, which EDM never does). c_noise is EDM's ln(s)/4, not the 1000 t of the
    other kinds: the U-Net and DiT feed it to the same sinusoidal embedding (frequencies 1 .. 1e-4) that EDM's
    PositionalEmbedding is, so, as in EDM, only the fastest frequencies vary over ln(s)/4 in about [-1.7, 1.3]."""

    name = "edm"

    def scalings(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """EDM's c_skip(s), c_out(s) (applied to y = x/alpha), s = sigma/alpha."""
        s, sd2 = sigma / alpha, self.sigma_data**2
        return sd2 / (s * s + sd2), s * self.sigma_data / torch.sqrt(s * s + sd2)

    def c_noise(self, t: Tensor) -> Tensor:
        return 0.25 * torch.log(self.sde.noise_ratio(t))

    def c_skip_out(self, t, alpha, sigma):
        c_skip, c_out = self.scalings(alpha, sigma)
        return c_skip / alpha, c_out

    def predict(self, out, x, t, alpha, sigma):
        c_skip, c_out = self.scalings(alpha, sigma)
        return split("x0", c_skip * (x / alpha) + c_out * out, x, alpha, sigma)


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    cls.name: cls
    for cls in (EpsParameterization, X0Parameterization, VParameterization, ScoreParameterization, FlowParameterization,
                ConsistencyParameterization, EDMParameterization)  # fmt: skip
}


def make_parameterization(name: str, sde: SDE, sigma_data: float = 0.5, scale_input: bool = True) -> Parameterization:
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown prediction type {name!r}; choose one of {', '.join(PARAMETERIZATIONS)}")
    return PARAMETERIZATIONS[name](sde, sigma_data, scale_input)
