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

from diffctl.samplers.common import Level, denoise, levels_of, noise_levels, start

SOLVERS = ("euler", "heun", "rk4", "dpmpp_2m", "adaptive")


def _eps(denoiser, y, level, labels) -> Tensor:
    return denoise(denoiser, y, level, labels).eps


def _euler_step(denoiser, y, now: Level, nxt: Level, labels):
    return y + (nxt.s - now.s) * _eps(denoiser, y, now, labels)


def _heun_step(denoiser, y, now: Level, nxt: Level, labels):
    h = nxt.s - now.s
    d1 = _eps(denoiser, y, now, labels)
    y_euler = y + h * d1
    return y + 0.5 * h * (d1 + _eps(denoiser, y_euler, nxt, labels))


def _rk4_step(denoiser, y, now: Level, nxt: Level, labels):
    h = nxt.s - now.s
    mid = Level.from_ratio(denoiser.sde, now.s + h / 2)
    k1 = _eps(denoiser, y, now, labels)
    k2 = _eps(denoiser, y + h / 2 * k1, mid, labels)
    k3 = _eps(denoiser, y + h / 2 * k2, mid, labels)
    k4 = _eps(denoiser, y + h * k3, nxt, labels)
    return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _dpmpp_2m(denoiser, y, levels, labels):
    """DPM-Solver++(2M) (Lu et al. 2022), data-prediction multistep in lambda = -log s; the first
    step is first order (DDIM) and so is the last, which lands on x0."""
    prev_x0, prev_h = None, None
    for now, nxt in zip(levels, levels[1:]):
        x0 = denoise(denoiser, y, now, labels).x0
        h = math.log(now.s / nxt.s)
        d = x0
        if prev_x0 is not None:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        y = (nxt.s / now.s) * y - math.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return denoise(denoiser, y, levels[-1], labels).x0


def _adaptive(denoiser, y, levels, labels, rtol: float, atol: float):
    """dopri5 (torchdiffeq) on dy/du = s eps with u = log s, from s(T) to s(sample_eps), then x0.
    The step size is chosen on the whole batch, so a sample can differ at the tolerance level
    with the batch it is in."""
    from torchdiffeq import odeint

    sde = denoiser.sde

    def rhs(u, y_):
        s = math.exp(float(u))
        return s * _eps(denoiser, y_, Level.from_ratio(sde, s), labels)

    u = torch.tensor([math.log(levels[0].s), math.log(levels[-1].s)], dtype=torch.float64)
    y = odeint(rhs, y, u.to(y.dtype), rtol=rtol, atol=atol, method="dopri5")[-1]
    return denoise(denoiser, y, levels[-1], labels).x0


_STEPS = {"euler": _euler_step, "heun": _heun_step, "rk4": _rk4_step}


@torch.inference_mode()
def ode(
    denoiser,
    x: Tensor,
    steps: int,
    labels=None,
    generators=None,
    solver: str = "dpmpp_2m",
    spacing: str = "auto",
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Tensor:
    """Deterministic sampling: the only randomness is the starting noise x.

    spacing="auto" is each solver's own choice: logsnr (uniform in log(alpha/sigma)) for dpmpp_2m,
    as DPM-Solver does; karras (EDM, rho=7) for euler, heun and rk4, as EDM does.

    NFE: euler and dpmpp_2m 1 per level; heun 2 and rk4 4 per level except the last (1);
    adaptive: whatever dopri5 needs for rtol/atol from T to eps (steps and spacing are unused).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    sde = denoiser.sde
    if solver == "adaptive":
        ends = levels_of(sde, torch.tensor([sde.T, sde.sample_eps], dtype=torch.float64))
        return _adaptive(denoiser, start(x, sde, ends[0]), ends, labels, rtol, atol)
    if spacing == "auto":
        spacing = "logsnr" if solver == "dpmpp_2m" else "karras"
    levels = levels_of(sde, noise_levels(sde, steps, spacing))
    y = start(x, denoiser.sde, levels[0])
    if solver == "dpmpp_2m":
        return _dpmpp_2m(denoiser, y, levels, labels)
    step = _STEPS[solver]
    for now, nxt in zip(levels, levels[1:]):
        y = step(denoiser, y, now, nxt, labels)
    return denoise(denoiser, y, levels[-1], labels).x0
