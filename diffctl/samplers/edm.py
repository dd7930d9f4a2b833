"""EDM's stochastic sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 2): Heun steps of the probability-flow ODE with "churn", noise added
before each step to climb from level s_i to s_hat = (1 + gamma_i) s_i.

In y = x/alpha, s = sigma/alpha (common.py) every SDE is EDM's own process y = x0 + s eps, so the
algorithm applies as written: s is EDM's sigma(t) = t. With S_churn = 0 it is exactly `ode`'s
deterministic Heun (solver=heun) on the same levels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffctl.samplers.common import RATIO_SPACINGS, SPACINGS, Level, denoise, spaced_levels, start
from diffctl.samplers.ode import SIGMA, heun_step
from diffctl.samplers.registry import below, not_above, only_for_spacings, register_sampler
from diffctl.schema.rules import Choice, Float


def churn(sde, y: Tensor, now: Level, gamma: float, S_noise: float, noise, top: Level) -> tuple[Tensor, Level]:
    """Algorithm 2, lines 4-6: s_hat = (1 + gamma) s_i, y_hat = y + sqrt(s_hat^2 - s_i^2) S_noise z.

    The model is called at times, so s_hat is a level of the SDE: Level.from_ratio (t_from_noise_ratio),
    capped at s(T), above which the SDE has no level (EDM's S_tmax = 50 < s(T) never meets the cap; a
    first level at T gets no churn). Returns (y_hat, its level); no noise is drawn when gamma is 0."""
    if gamma <= 0:
        return y, now
    s_hat = now.s * (1.0 + gamma)
    hat = top if s_hat >= top.s else Level.from_ratio(sde, s_hat)
    if hat.s <= now.s:
        return y, now
    return y + (math.sqrt(hat.s**2 - now.s**2) * S_noise) * noise.randn_like(y), hat


def churn_levels(S_churn: float, S_tmin: float, S_tmax: float | None, levels: list[Level]) -> list[float]:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= s_i <= S_tmax (null: no upper end), else 0;
    N = len(levels), EDM's number of steps (its last goes to sigma = 0)."""
    gamma = min(S_churn / len(levels), math.sqrt(2.0) - 1.0)
    hi = math.inf if S_tmax is None else S_tmax
    return [gamma if S_tmin <= lv.s <= hi else 0.0 for lv in levels]


@register_sampler(
    "edm",
    S_churn=Float(ge=0, hint="0 = ode solver=heun"), S_tmin=Float(ge=0), S_tmax=Float(ge=0, null=True, hint="null = no upper end"),
    S_noise=Float(gt=0), spacing=Choice(*SPACINGS),
    sigma_min=Float(gt=0, null=True, hint=SIGMA), sigma_max=Float(gt=0, null=True, hint=SIGMA),
    checks=(not_above("S_tmin", "S_tmax"), below("sigma_min", "sigma_max"),
            only_for_spacings("sigma_min", RATIO_SPACINGS), only_for_spacings("sigma_max", RATIO_SPACINGS)),
)  # fmt: skip
@torch.inference_mode()
def edm(
    model,
    x: Tensor,
    steps: int,
    cond=None,
    noise=None,
    *,
    S_churn: float = 40.0,
    S_tmin: float = 0.05,
    S_tmax: float | None = 50.0,
    S_noise: float = 1.003,
    spacing: str = "karras",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Karras et al. 2022, Algorithm 2. At each level s_i: churn to s_hat (see `churn`), then an Euler
    step from s_hat to s_{i+1} with d = eps(y_hat, s_hat) = (y_hat - D(y_hat)) / s_hat, corrected by
    Heun's rule with d at s_{i+1} (`ode`'s Heun step, started at s_hat).

    The defaults are EDM's ImageNet-64 settings (its Table 5): S_churn 40, S_tmin 0.05, S_tmax 50,
    S_noise 1.003; gamma_i does not depend on i, so S_churn/steps sets the churn (at most sqrt(2) - 1).
    Levels: karras (rho 7) from sigma_max down to sigma_min as in `ode` (None: s(T) and s(sample_eps)),
    or any spacing without an s range.

    The end: EDM's last step goes from t_{N-1} (its sigma_min, 0.002) to sigma = 0, an Euler step
    that lands on D(x_hat, t_hat) with no Heun correction. Here the last level is s(sample_eps) (or
    sigma_min), and the sampler returns the x0 prediction there (after its churn, if s_{N-1} lies in
    [S_tmin, S_tmax]), as `ode`'s Heun does: the same step, at our last level instead of EDM's.
    NFE: 2 per level except the last (1): 2 steps - 1, as EDM's 2N - 1.
    """
    sde = model.sde
    levels = spaced_levels(sde, steps, spacing, sigma_min, sigma_max)
    gammas = churn_levels(S_churn, S_tmin, S_tmax, levels)
    top = Level(sde, sde.T)
    y = start(x, sde, levels[0])
    for i, (now, gamma) in enumerate(zip(levels, gammas)):
        y, hat = churn(sde, y, now, gamma, S_noise, noise, top)
        if i + 1 < len(levels):
            y = heun_step(model, y, hat, levels[i + 1], cond)
    return denoise(model, y, hat, cond).x0
