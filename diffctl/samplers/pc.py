"""Score-SDE predictor-corrector sampling (Song et al. 2021), NCSN's annealed Langevin dynamics among it.

It walks the noise levels of `noise_levels` in y = x/alpha, s = sigma/alpha variables (see common.py)
and ends by returning the x0 prediction at the last level.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from diffctl.samplers.common import SPACINGS, VARIANCES, Level, ancestral_step, denoise, levels_of, noise_levels, start
from diffctl.samplers.registry import only_with, register_sampler
from diffctl.schema.rules import Choice, Float, Int

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
    return ancestral_step(y, denoise(model, y, now, cond).x0, now, nxt, variance, noise)


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


@register_sampler(
    "pc",
    predictor=Choice(*PREDICTORS), corrector=Choice(*CORRECTORS), snr=Float(gt=0), corrector_steps=Int(lo=0),
    variance=Choice(*VARIANCES), spacing=Choice(*SPACINGS),
    checks=(only_with("variance", "small", "predictor", "ancestral"),),
)  # fmt: skip
@torch.inference_mode()
def pc(
    model,
    x: Tensor,
    steps: int,
    cond=None,
    noise=None,
    *,
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
