"""What every sampler shares: the noise-level grid, and model calls at a level.

All samplers work in the variables y = x / alpha(t), s = sigma(t) / alpha(t). In them every SDE
(VP, sub-VP, VE) is the same VE process y_t = x0 + s(t) eps, so one formula serves all three; the
network is still called on x = alpha * y at the time t(s).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from diffctl.parameterization import Prediction
from diffctl.errors import ConfigError

SPACINGS = ("uniform", "quadratic", "trailing", "leading", "karras", "logsnr")
VARIANCES = ("small", "large")  # of an ancestral step (ddpm, pc's ancestral predictor)


# DDIM's two grids pick timesteps of DDPM's 1000-step training chain. Timestep i (0..999) is placed at
# t = t_end + (T - t_end) i / 999: evenly from t_end (timestep 0) to T (timestep 999), which for VP's
# sample_eps = 1e-3 is DDPM's own t = (i + 1)/1000 (see sde.ddpm_betas).
DDPM_TIMESTEPS = 1000


def _ddpm_timesteps(timesteps: Tensor, T: float, t_end: float) -> Tensor:
    t = t_end + (T - t_end) * timesteps.to(torch.float64) / (DDPM_TIMESTEPS - 1)
    return torch.where(timesteps == DDPM_TIMESTEPS - 1, T, t)  # exactly T despite rounding


def _ddim_grid(steps: int, spacing: str, T: float, t_end: float) -> Tensor:
    """DDIM's timesteps (Song et al. 2021, ermongroup/ddim runners/diffusion.py), largest first, as times.

    leading: k * (1000 // steps), k = 0..steps-1 (DDIM's skip_type=uniform when steps divides 1000;
      for other steps DDIM's range(0, 1000, 1000 // steps) has more than `steps` entries, and we keep
      exactly `steps`, as diffusers' timestep_spacing="leading" does).
    quadratic: int(linspace(0, sqrt(0.8 * 1000), steps)^2) (DDIM's skip_type=quad, its CIFAR-10 grid;
      top timestep 800, t ~ 0.8). For steps >= 30 the int() rounding repeats small timesteps; DDIM's
      sampler spends an evaluation on each repeat and does not move, we visit each timestep once.
    """
    if steps > DDPM_TIMESTEPS:
        raise ConfigError(
            f"spacing={spacing} picks timesteps of DDPM's {DDPM_TIMESTEPS}-step chain, so it allows at most "
            f"{DDPM_TIMESTEPS} steps (got {steps}); use spacing=trailing or uniform"
        )
    if spacing == "leading":
        timesteps = torch.arange(steps, dtype=torch.int64) * (DDPM_TIMESTEPS // steps)
    else:  # numpy's float64 linspace and int() truncation, the arithmetic of DDIM's own code
        grid = np.linspace(0.0, np.sqrt(0.8 * DDPM_TIMESTEPS), steps) ** 2
        timesteps = torch.tensor(sorted({int(v) for v in grid}), dtype=torch.int64)
    return _ddpm_timesteps(timesteps.flip(0), T, t_end)


def noise_levels(sde, steps: int, spacing: str = "uniform", rho: float = 7.0, t_end: float | None = None) -> Tensor:
    """Diffusion times t_0 > t_1 > ... (float64; `steps` of them, fewer for quadratic at steps >= 30) at which a
    sampler calls the network. Every sampler ends with a step from the last level to noise level 0,
    i.e. it returns the denoised x0 prediction there (no noise added at the end). t_end (default
    sde.sample_eps) is the last level of every spacing except trailing.

    uniform: uniform in t from T to t_end (ours; DDIM's "uniform" is `leading`).
    trailing: T, T(N-1)/N, ..., T/N (Lin et al. 2024: start exactly at T, evenly spaced); it ends at
      T/N, not at t_end (steps=1000 on VP is DDPM's own chain).
    leading / quadratic: DDIM's two grids of DDPM timesteps (see `_ddim_grid`); both start below T,
      where the prior is still a good stand-in for the marginal (see `start`), and end at t_end.
    karras: s = sigma/alpha spaced uniformly in s^(1/rho) from s(T) to s(t_end) (EDM, rho = 7).
    logsnr: uniform in log s, i.e. in log-SNR (DPM-Solver's choice).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T, eps = sde.T, (sde.sample_eps if t_end is None else t_end)
    if spacing == "trailing":
        t = T * torch.arange(steps, 0, -1, dtype=torch.float64) / steps
        t[0] = T  # T steps / steps need not round back to T (sde=linear's 0.995), and `start` tests t == T
        return t
    if spacing in ("leading", "quadratic"):
        return _ddim_grid(steps, spacing, T, eps)
    u = torch.linspace(0.0, 1.0, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    if spacing == "uniform":
        t = T + (eps - T) * u
    else:
        s_max = float(sde.noise_ratio(torch.tensor(T, dtype=torch.float64)))
        s_min = float(sde.noise_ratio(torch.tensor(eps, dtype=torch.float64)))
        if spacing == "karras":
            s = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        else:
            s = torch.exp(math.log(s_max) + u * (math.log(s_min) - math.log(s_max)))
        t = sde.t_from_noise_ratio(s)
    t[0] = T  # exact end points despite rounding and the bisection in t_from_noise_ratio
    if steps > 1:
        t[-1] = eps
    return t


class Level:
    """A noise level: time t, alpha(t), sigma(t) and s = sigma/alpha as Python floats (float64)."""

    def __init__(self, sde, t: float):
        tt = torch.tensor(float(t), dtype=torch.float64)
        self.t = float(t)
        self.alpha = float(sde.alpha(tt))
        self.sigma = float(sde.sigma(tt))
        self.s = self.sigma / self.alpha

    @classmethod
    def from_ratio(cls, sde, s: float) -> "Level":
        return cls(sde, float(sde.t_from_noise_ratio(torch.tensor(s, dtype=torch.float64))))


def start(x: Tensor, sde, level: Level) -> Tensor:
    """y = x/alpha at the first level from a prior draw x ~ N(0, prior_std^2) made for time T.

    The prior stands for y_T ~ N(0, (prior_std/alpha_T)^2) = N(0, s_T^2 + v), where v is the data
    variance it implicitly assumes (1 for VP, 0 for VE). A schedule that starts lower (leading, quadratic)
    gets the same prior at its level: y ~ N(0, s^2 + v); at T this is exactly x/alpha_T.
    """
    prior = sde.prior_std()
    top = Level(sde, sde.T)
    if level.t == top.t:
        return x / top.alpha
    v = max((prior / top.alpha) ** 2 - top.s**2, 0.0)
    return x * (math.sqrt(level.s**2 + v) / prior)


def denoise(model, y: Tensor, level: Level, cond) -> Prediction:
    """The model's prediction for y = x / alpha at `level`."""
    t = torch.full((y.shape[0],), level.t, dtype=y.dtype, device=y.device)
    return model(level.alpha * y, t, cond)


def levels_of(sde, times: Tensor) -> list[Level]:
    return [Level(sde, float(t)) for t in times]


def ratio_levels(sde, steps: int, spacing: str, s_max: float | None = None, s_min: float | None = None, rho: float = 7.0) -> Tensor:
    """`steps` times (float64) of karras or logsnr levels (as in `noise_levels`) that run from
    s = sigma/alpha = s_max down to s_min (EDM's sigma_max and sigma_min) instead of from s(T) to
    s(sample_eps); None keeps that end. Each end is clamped into what the SDE has, [s(eps), s(T)];
    a start below T gets the prior at its level (see `start`)."""
    if spacing not in ("karras", "logsnr"):
        raise ValueError(f"an s range needs spacing karras or logsnr, got {spacing!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ratio = lambda t: float(sde.noise_ratio(torch.tensor(t, dtype=torch.float64)))
    top, bottom = ratio(sde.T), ratio(sde.eps)
    hi = top if s_max is None else min(max(float(s_max), bottom), top)
    lo = ratio(sde.sample_eps) if s_min is None else max(float(s_min), bottom)
    lo = min(lo, hi)
    u = torch.linspace(0.0, 1.0, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    if spacing == "karras":
        s = (hi ** (1 / rho) + u * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    else:
        s = torch.exp(math.log(hi) + u * (math.log(lo) - math.log(hi)))
    t = sde.t_from_noise_ratio(s)
    if hi == top:
        t[0] = sde.T  # exact ends despite the bisection: a start at T uses the prior draw as it is
    if s_min is None and steps > 1:
        t[-1] = sde.sample_eps
    return t


RATIO_SPACINGS = ("karras", "logsnr")  # the spacings whose ends sigma_min / sigma_max can move (ratio_levels)


def spaced_levels(sde, steps: int, spacing: str, sigma_min: float | None = None, sigma_max: float | None = None) -> list[Level]:
    """The levels of a sampler with a spacing and an optional s range: karras and logsnr levels from
    sigma_max down to sigma_min (`ratio_levels`; None: the SDE's own end), the other spacings' from
    `noise_levels`, which take no s range. With both ends None every spacing is `noise_levels`' own."""
    if spacing in RATIO_SPACINGS:
        return levels_of(sde, ratio_levels(sde, steps, spacing, sigma_max, sigma_min))
    if sigma_min is not None or sigma_max is not None:
        raise ValueError(f"sigma_min / sigma_max need spacing karras or logsnr, got {spacing!r}")
    return levels_of(sde, noise_levels(sde, steps, spacing))


def posterior(y: Tensor, x0: Tensor, now: Level, nxt: Level) -> tuple[Tensor, float]:
    """Mean and std of q(y_s | y_t, x0) for the VE process in y (s = nxt.s < t's now.s).

    In x variables this is DDPM's posterior with variance beta-tilde for VP, and the SMLD
    ancestral rule sigma'^2 (sigma^2 - sigma'^2) / sigma^2 for VE (Song et al. 2021, App. F).
    """
    ratio = (nxt.s / now.s) ** 2
    return ratio * y + (1.0 - ratio) * x0, nxt.s * math.sqrt(1.0 - ratio)


def ancestral_step(y: Tensor, x0: Tensor, now: Level, nxt: Level, variance: str, noise) -> Tensor:
    """One ancestral step from `now` to `nxt`: the posterior mean of q(y_s | y_t, x0) plus noise of
    variance small = the posterior's (DDPM's beta-tilde, "fixed small") or large = the forward
    transition's: x_t | x_s has variance v = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2 (DDPM's beta_t,
    "fixed large", for VP; sigma_t^2 - sigma_s^2 for VE), which is (alpha_t/alpha_s)^2 (s_t^2 - s_s^2) in y."""
    mean, std = posterior(y, x0, now, nxt)
    if variance == "large":
        std = now.alpha / nxt.alpha * math.sqrt(now.s**2 - nxt.s**2)
    return mean + std * noise.randn_like(y)
