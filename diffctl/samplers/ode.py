"""Probability-flow ODE solvers.

In y = x/alpha, s = sigma/alpha the probability-flow ODE of every SDE is dy/ds = eps(y, s)
(Karras et al. 2022; Song et al. 2021 for DDIM): integrating in these variables is what makes few
steps work. All fixed-step solvers visit the levels of `noise_levels` and take their last step to
s = 0 as an Euler step, which is exactly the x0 prediction (EDM does the same).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffctl.samplers.common import SPACINGS, Level, denoise, levels_of, noise_levels, ratio_levels, start
from diffctl.samplers.registry import below, register_sampler
from diffctl.schema.rules import Bool, Choice, Float

SOLVERS = ("euler", "heun", "rk4", "dpmpp_2m", "adaptive")


def _eps(model, y, level, cond) -> Tensor:
    return denoise(model, y, level, cond).eps


def _euler_step(model, y, now: Level, nxt: Level, cond):
    return y + (nxt.s - now.s) * _eps(model, y, now, cond)


def heun_step(model, y, now: Level, nxt: Level, cond):
    h = nxt.s - now.s
    d1 = _eps(model, y, now, cond)
    y_euler = y + h * d1
    return y + 0.5 * h * (d1 + _eps(model, y_euler, nxt, cond))


def _rk4_step(model, y, now: Level, nxt: Level, cond):
    h = nxt.s - now.s
    mid = Level.from_ratio(model.sde, now.s + h / 2)
    k1 = _eps(model, y, now, cond)
    k2 = _eps(model, y + h / 2 * k1, mid, cond)
    k3 = _eps(model, y + h / 2 * k2, mid, cond)
    k4 = _eps(model, y + h * k3, nxt, cond)
    return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _dpmpp_2m(model, y, levels, cond, lower_order_final: bool):
    """DPM-Solver++(2M) (Lu et al. 2022), data-prediction multistep in lambda = -log s; the first
    step is first order (DDIM). lower_order_final: so is the step to the last level where it is over
    twice as long in lambda as the step before (r = h_prev/h < 1/2): there the 2M correction, weight
    1/(2r), extrapolates further than the two data predictions it comes from are apart (uniform
    levels' jump to sample_eps: r ~ 0.2; trailing ~ 0.6, karras ~ 0.8, logsnr 1). DPM-Solver and
    diffusers lower the final step by step count instead (below 10 / 15 steps). Then x0 at the last level."""
    prev_x0, prev_h = None, None
    last = len(levels) - 2
    for i, (now, nxt) in enumerate(zip(levels, levels[1:])):
        x0 = denoise(model, y, now, cond).x0
        h = math.log(now.s / nxt.s)
        d = x0
        if prev_x0 is not None and not (lower_order_final and i == last and prev_h / h < 0.5):
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        y = (nxt.s / now.s) * y - math.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return denoise(model, y, levels[-1], cond).x0


def _adaptive(model, y, levels, cond, rtol: float, atol: float):
    """dopri5 (torchdiffeq) on dy/du = s eps with u = log s, from s(T) to s(sample_eps), then x0.
    The step size is chosen on the whole batch, so a sample can differ at the tolerance level
    with the batch it is in."""
    from torchdiffeq import odeint

    sde = model.sde

    def rhs(u, y_):
        s = math.exp(float(u))
        return s * _eps(model, y_, Level.from_ratio(sde, s), cond)

    u = torch.tensor([math.log(levels[0].s), math.log(levels[-1].s)], dtype=torch.float64)
    y = odeint(rhs, y, u.to(y.dtype), rtol=rtol, atol=atol, method="dopri5")[-1]
    return denoise(model, y, levels[-1], cond).x0


_STEPS = {"euler": _euler_step, "heun": heun_step, "rk4": _rk4_step}


SIGMA = "s = sigma/alpha; null = the SDE's own end"


@register_sampler(
    "ode",
    solver=Choice(*SOLVERS), spacing=Choice(*SPACINGS, "auto"), rtol=Float(gt=0), atol=Float(gt=0),
    lower_order_final=Bool(), sigma_min=Float(gt=0, null=True, hint=SIGMA), sigma_max=Float(gt=0, null=True, hint=SIGMA),
    checks=(below("sigma_min", "sigma_max"),),
)  # fmt: skip
@torch.inference_mode()
def ode(
    model,
    x: Tensor,
    steps: int,
    cond=None,
    noise=None,
    *,
    solver: str = "dpmpp_2m",
    spacing: str = "auto",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    lower_order_final: bool = True,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Deterministic sampling: the only randomness is the starting noise x.

    spacing="auto" is each solver's own choice: logsnr (uniform in log(alpha/sigma)) for dpmpp_2m,
    as DPM-Solver does; karras (EDM, rho=7) for euler, heun and rk4, as EDM does. karras levels run
    from s = sigma/alpha = sigma_max down to sigma_min (None: the SDE's own end, s(T) or
    s(sample_eps)), each clamped to the SDE's range; the others from T to sample_eps.
    lower_order_final: dpmpp_2m's step to the last level at first order (see _dpmpp_2m).

    NFE: euler and dpmpp_2m 1 per level; heun 2 and rk4 4 per level except the last (1);
    adaptive: whatever dopri5 needs for rtol/atol from T to eps (steps and spacing are unused).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    sde = model.sde
    if solver == "adaptive":
        ends = levels_of(sde, torch.tensor([sde.T, sde.sample_eps], dtype=torch.float64))
        return _adaptive(model, start(x, sde, ends[0]), ends, cond, rtol, atol)
    if spacing == "auto":
        spacing = "logsnr" if solver == "dpmpp_2m" else "karras"
    if spacing == "karras":
        times = ratio_levels(sde, steps, spacing, sigma_max, sigma_min)
    else:
        times = noise_levels(sde, steps, spacing)
    levels = levels_of(sde, times)
    y = start(x, model.sde, levels[0])
    if solver == "dpmpp_2m":
        return _dpmpp_2m(model, y, levels, cond, lower_order_final)
    step = _STEPS[solver]
    for now, nxt in zip(levels, levels[1:]):
        y = step(model, y, now, nxt, cond)
    return denoise(model, y, levels[-1], cond).x0
