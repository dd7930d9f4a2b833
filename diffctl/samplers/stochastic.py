"""Stochastic samplers: DDPM ancestral, DDIM (any eta) and score-SDE predictor-corrector.

Each walks the noise levels of `noise_levels` in y = x/alpha, s = sigma/alpha variables (see
common.py) and ends by returning the x0 prediction at the last level.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from diffctl.samplers.common import Level, denoise, levels_of, noise_levels, start


def _posterior(y: Tensor, x0: Tensor, now: Level, nxt: Level) -> tuple[Tensor, float]:
    """Mean and std of q(y_s | y_t, x0) for the VE process in y (s = nxt.s < t's now.s).

    In x variables this is DDPM's posterior with variance beta-tilde for VP, and the SMLD
    ancestral rule sigma'^2 (sigma^2 - sigma'^2) / sigma^2 for VE (Song et al. 2021, App. F).
    """
    ratio = (nxt.s / now.s) ** 2
    return ratio * y + (1.0 - ratio) * x0, nxt.s * math.sqrt(1.0 - ratio)


VARIANCES = ("small", "large")


def _ancestral_step(y: Tensor, x0: Tensor, now: Level, nxt: Level, variance: str, noise) -> Tensor:
    """One ancestral step from `now` to `nxt`: the posterior mean of q(y_s | y_t, x0) plus noise of
    variance small = the posterior's (DDPM's beta-tilde, "fixed small") or large = the forward
    transition's: x_t | x_s has variance v = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2 (DDPM's beta_t,
    "fixed large", for VP; sigma_t^2 - sigma_s^2 for VE), which is (alpha_t/alpha_s)^2 (s_t^2 - s_s^2) in y."""
    mean, std = _posterior(y, x0, now, nxt)
    if variance == "large":
        std = now.alpha / nxt.alpha * math.sqrt(now.s**2 - nxt.s**2)
    return mean + std * noise.randn_like(y)


@torch.inference_mode()
def ddpm(model, x: Tensor, steps: int, cond=None, noise=None, variance: str = "small", spacing: str = "trailing") -> Tensor:
    """Ancestral sampling: draw x_s ~ q(x_s | x_t, x0 = predicted x0) level by level (Ho et al. 2020),
    with the posterior's variance (variance=small) or the forward step's (variance=large)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    levels = levels_of(model.sde, noise_levels(model.sde, steps, spacing))
    y = start(x, model.sde, levels[0])
    for now, nxt in zip(levels, levels[1:]):
        y = _ancestral_step(y, denoise(model, y, now, cond).x0, now, nxt, variance, noise)
    return denoise(model, y, levels[-1], cond).x0


@torch.inference_mode()
def ddim(model, x: Tensor, steps: int, cond=None, noise=None, eta: float = 0.0, spacing: str = "trailing") -> Tensor:
    """DDIM (Song et al. 2021): y_s = x0 + sqrt(s'^2 - c^2) eps + c z with c = eta * posterior std.

    eta = 0 is deterministic (an Euler step of the probability-flow ODE in y, s); eta = 1 is exactly
    DDPM's ancestral step.
    """
    levels = levels_of(model.sde, noise_levels(model.sde, steps, spacing))
    y = start(x, model.sde, levels[0])
    for now, nxt in zip(levels, levels[1:]):
        pred = denoise(model, y, now, cond)
        c = eta * nxt.s * math.sqrt(1.0 - (nxt.s / now.s) ** 2)
        y = pred.x0 + math.sqrt(max(nxt.s**2 - c * c, 0.0)) * pred.eps
        if c > 0:
            y = y + c * noise.randn_like(y)
    return denoise(model, y, levels[-1], cond).x0


# ------------------------------------------------------------------ predictor-corrector
# A predictor moves y from level `now` to level `nxt`; a corrector runs Langevin steps at `now`.
# Both return the new y; `score` of x at a level is -eps / sigma.


def _euler_maruyama(model, y, now: Level, nxt: Level, cond, noise):
    """Euler-Maruyama on the reverse SDE dx = [f - g^2 score] dt + g dw_bar, in x and t."""
    sde = model.sde
    x = now.alpha * y
    t = torch.full((x.shape[0],), now.t, dtype=x.dtype, device=x.device)
    dt = nxt.t - now.t  # negative
    g = float(sde.diffusion(torch.tensor(now.t, dtype=torch.float64)))
    score = denoise(model, y, now, cond).score
    x = x + (sde.drift(x, t) - g * g * score) * dt + g * math.sqrt(-dt) * noise.randn_like(x)
    return x / nxt.alpha


def _reverse_diffusion(model, y, now: Level, nxt: Level, cond, noise):
    """Reverse of the discretized forward step x_t = a x_s + b z (a = alpha_t/alpha_s,
    b^2 = sigma_t^2 - a^2 sigma_s^2): x_s = (2 - a) x_t + b^2 score + b z (score SDE's
    ReverseDiffusionPredictor, written for any alpha, sigma)."""
    a = now.alpha / nxt.alpha
    b2 = max(now.sigma**2 - a * a * nxt.sigma**2, 0.0)
    x = now.alpha * y
    score = denoise(model, y, now, cond).score
    x = (2.0 - a) * x + b2 * score + math.sqrt(b2) * noise.randn_like(x)
    return x / nxt.alpha


def _ancestral(model, y, now: Level, nxt: Level, cond, noise, variance: str = "small"):
    """`ddpm`'s step. score_sde's AncestralSamplingPredictor is variance=large for VP (beta_i) and
    variance=small for VE (sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2)."""
    return _ancestral_step(y, denoise(model, y, now, cond).x0, now, nxt, variance, noise)


def _no_predictor(model, y, now, nxt, cond, noise):
    return y


PREDICTORS = {
    "euler_maruyama": _euler_maruyama,
    "reverse_diffusion": _reverse_diffusion,
    "ancestral": _ancestral,
    "none": _no_predictor,
}


def _langevin_step(model, y, now: Level, cond, noise, step_size):
    """One Langevin step x <- x + e * score + sqrt(2 e) z at a fixed level; e = step_size(score, z), a float."""
    x = now.alpha * y
    score = denoise(model, y, now, cond).score
    z = noise.randn_like(x)
    e = step_size(score, z)
    return (x + e * score + math.sqrt(2.0 * e) * z) / now.alpha


def _langevin(model, y, now: Level, nxt: Level | None, cond, noise, snr: float):
    """score SDE's Langevin corrector: e = 2 a^2 (snr ||z|| / ||score||)^2 with the norms averaged
    over the batch, as score_sde and diffusers' ScoreSdeVeScheduler do. The batch mean is what
    makes it work in low dimension (a per-sample norm can be near 0 and blow the step up), but it
    makes a sample depend on its batch; `ald` has the same step at high noise and does not. For
    VP-type SDEs the step is scaled by a^2 = (alpha_t / alpha_next)^2, score SDE's alpha_i = 1 - beta_i."""
    a2 = (now.alpha / nxt.alpha) ** 2 if nxt is not None else 1.0

    def step_size(score, z):
        ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
        return 2.0 * a2 * (snr * ratio) ** 2

    return _langevin_step(model, y, now, cond, noise, step_size)


def _annealed_langevin(model, y, now: Level, nxt: Level | None, cond, noise, snr: float):
    """NCSN's annealed Langevin dynamics: step e = 2 a^2 (snr * sigma_t)^2 at each level."""
    a2 = (now.alpha / nxt.alpha) ** 2 if nxt is not None else 1.0
    e = 2.0 * a2 * (snr * now.sigma) ** 2

    return _langevin_step(model, y, now, cond, noise, lambda score, z: e)


CORRECTORS = {"langevin": _langevin, "ald": _annealed_langevin, "none": None}


@torch.inference_mode()
def pc(
    model,
    x: Tensor,
    steps: int,
    cond=None,
    noise=None,
    predictor: str = "reverse_diffusion",
    corrector: str = "ald",
    snr: float = 0.16,
    corrector_steps: int = 1,
    variance: str = "small",
    spacing: str = "uniform",
) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1): at each level run `corrector_steps`
    corrector steps, then one predictor step to the next level; the last level denoises to x0.
    predictor=none with corrector=ald is NCSN's annealed Langevin dynamics; `variance` is the
    ancestral predictor's (as in `ddpm`)."""
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}; choose one of {', '.join(CORRECTORS)}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    levels = levels_of(model.sde, noise_levels(model.sde, steps, spacing))
    correct, predict = CORRECTORS[corrector], PREDICTORS[predictor]
    if predictor == "ancestral":
        predict = functools.partial(_ancestral, variance=variance)
    y = start(x, model.sde, levels[0])
    for i, now in enumerate(levels):
        nxt = levels[i + 1] if i + 1 < len(levels) else None
        for _ in range(corrector_steps if correct else 0):
            y = correct(model, y, now, nxt, cond, noise, snr)
        if nxt is not None:
            y = predict(model, y, now, nxt, cond, noise)
    return denoise(model, y, levels[-1], cond).x0
