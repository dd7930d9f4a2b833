"""The SDE samplers of k-diffusion (Crowson, k_diffusion/sampling.py) that users ask for by name:
Euler ancestral, DPM-Solver++(2M) SDE and DPM-Solver++(3M) SDE.

k-diffusion samples the VE process x = x0 + sigma eps on a list of sigmas ending with 0. Here that
process is y = x/alpha with s = sigma/alpha (common.py), for every SDE, so its sigmas are our levels'
s, and its last step, to sigma = 0 (which each of these samplers takes as x = denoised), is our x0
prediction at the last level. The network is called on x = alpha y at the level's time. k-diffusion
draws the noise of its DPM++ SDE samplers from a Brownian tree by default; its increments over the
steps are independent normals, which is what `noise` gives here (per sample, batch-independent).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffctl.samplers.common import RATIO_SPACINGS, SPACINGS, Level, denoise, spaced_levels, start
from diffctl.samplers.ode import SIGMA
from diffctl.samplers.registry import below, only_for_spacings, register_sampler
from diffctl.schema.rules import Choice, Float

SOLVER_TYPES = ("midpoint", "heun")  # dpmpp_2m_sde's second-order correction


def _levels(model, x: Tensor, steps: int, spacing: str, sigma_min, sigma_max) -> tuple[list[Level], Tensor]:
    levels = spaced_levels(model.sde, steps, spacing, sigma_min, sigma_max)
    return levels, start(x, model.sde, levels[0])


def _options(**extra):
    """The options every sampler here shares (eta, s_noise, levels), with their rules."""
    return dict(
        eta=Float(ge=0, hint="0 = no noise (the probability-flow ODE), 1 = k-diffusion's default"), s_noise=Float(ge=0),
        **extra, spacing=Choice(*SPACINGS),
        sigma_min=Float(gt=0, null=True, hint=SIGMA), sigma_max=Float(gt=0, null=True, hint=SIGMA),
        checks=(below("sigma_min", "sigma_max"), only_for_spacings("sigma_min", RATIO_SPACINGS),
                only_for_spacings("sigma_max", RATIO_SPACINGS)),
    )  # fmt: skip


def ancestral_split(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """(s_down, s_up) of an ancestral step from s to s_next (k-diffusion's get_ancestral_step):
    s_up = min(s_next, eta * s_next sqrt(1 - s_next^2 / s^2)), s_down = sqrt(s_next^2 - s_up^2). A
    deterministic step to s_down plus noise of std s_up lands at s_next. At eta = 1 s_up is the DDPM
    posterior's std and s_down = s_next^2 / s, so the step is `ddpm`'s (variance=small)."""
    if eta == 0:
        return s_next, 0.0
    up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return math.sqrt(s_next**2 - up**2), up


@register_sampler("euler_ancestral", **_options())
@torch.inference_mode()
def euler_ancestral(
    model,
    x: Tensor,
    steps: int,
    cond=None,
    noise=None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    spacing: str = "karras",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral, "Euler a"): an Euler step of the
    probability-flow ODE dy/ds = eps from s to s_down, then noise of std s_noise * s_up
    (`ancestral_split`). eta = 0 is `ode` solver=euler; eta = 1 with s_noise = 1 is DDPM's ancestral
    step (Ho et al. 2020) on these levels. NFE = steps."""
    levels, y = _levels(model, x, steps, spacing, sigma_min, sigma_max)
    for now, nxt in zip(levels, levels[1:]):
        eps = denoise(model, y, now, cond).eps  # = (y - D(y)) / s, k-diffusion's to_d
        down, up = ancestral_split(now.s, nxt.s, eta)
        y = y + (down - now.s) * eps
        if up > 0 and s_noise > 0:
            y = y + (s_noise * up) * noise.randn_like(y)
    return denoise(model, y, levels[-1], cond).x0


@register_sampler("dpmpp_2m_sde", **_options(solver_type=Choice(*SOLVER_TYPES)))
@torch.inference_mode()
def dpmpp_2m_sde(
    model,
    x: Tensor,
    steps: int,
    cond=None,
    noise=None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    spacing: str = "karras",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", data prediction; k-diffusion's
    sample_dpmpp_2m_sde). In lambda = -log s, step h = log(s / s_next):

        y' = (s_next / s) e^{-eta h} y + (1 - e^{-(1 + eta) h}) D + c (D - D_prev) / r
             + s_next sqrt(1 - e^{-2 eta h}) s_noise z,        r = h_prev / h,

    with c = (1 - e^{-(1+eta) h}) / 2 (midpoint) or 1 - (1 - e^{-(1+eta) h}) / ((1+eta) h) (heun);
    the first step has no correction (first order). eta = 1 is the reverse SDE's exact solution for
    a constant D, diffusers' sde-dpmsolver++ (order 2); eta = 0 is the ODE's DPM-Solver++(2M), `ode`
    solver=dpmpp_2m (with lower_order_final=false). NFE = steps."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; choose one of {', '.join(SOLVER_TYPES)}")
    levels, y = _levels(model, x, steps, spacing, sigma_min, sigma_max)
    prev_x0, prev_h = None, None
    for now, nxt in zip(levels, levels[1:]):
        x0 = denoise(model, y, now, cond).x0
        h = math.log(now.s / nxt.s)
        eta_h = eta * h
        first = -math.expm1(-h - eta_h)  # 1 - e^{-(1 + eta) h}
        y = (nxt.s / now.s * math.exp(-eta_h)) * y + first * x0
        if prev_x0 is not None:
            c = 0.5 * first if solver_type == "midpoint" else 1.0 - first / (h + eta_h)
            y = y + (c * h / prev_h) * (x0 - prev_x0)
        if eta_h > 0 and s_noise > 0:
            y = y + (nxt.s * math.sqrt(-math.expm1(-2.0 * eta_h)) * s_noise) * noise.randn_like(y)
        prev_x0, prev_h = x0, h
    return denoise(model, y, levels[-1], cond).x0


@register_sampler("dpmpp_3m_sde", **_options())
@torch.inference_mode()
def dpmpp_3m_sde(
    model,
    x: Tensor,
    steps: int,
    cond=None,
    noise=None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    spacing: str = "karras",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde; Lu et al. 2022's third-order
    multistep for data prediction, with the noise of `dpmpp_2m_sde`). With g = (1 + eta) h,
    phi_2 = (e^{-g} - 1)/g + 1 and phi_3 = phi_2/g - 1/2:

        y' = e^{-g} y + (1 - e^{-g}) D + phi_2 D1 - phi_3 D2 + s_next sqrt(1 - e^{-2 eta h}) s_noise z,

    D1, D2 the first and second divided differences of the last three data predictions in lambda
    (D1 ~ h D', D2 ~ h^2 D''/2); the first step is first order, the second uses phi_2 D1 alone. eta = 0
    is DPM-Solver++(3M) for the ODE (diffusers' dpmsolver++, solver_order=3). At eta = 1 diffusers'
    sde-dpmsolver++ at order 3 adds -(phi_3 + 1) D2 instead of -phi_3 D2 (the sign of its 1/2; see
    tests/test_sde_samplers.py); this follows k-diffusion. NFE = steps."""
    levels, y = _levels(model, x, steps, spacing, sigma_min, sigma_max)
    x0_1 = x0_2 = h_1 = h_2 = None  # the data predictions and step lengths one and two steps back
    for now, nxt in zip(levels, levels[1:]):
        x0 = denoise(model, y, now, cond).x0
        h = math.log(now.s / nxt.s)
        g = (1.0 + eta) * h
        y = math.exp(-g) * y + (-math.expm1(-g)) * x0
        phi_2 = math.expm1(-g) / g + 1.0
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            y = y + phi_2 * d1 - (phi_2 / g - 0.5) * d2
        elif h_1 is not None:
            y = y + (phi_2 * h / h_1) * (x0 - x0_1)
        if eta > 0 and s_noise > 0:
            y = y + (nxt.s * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise) * noise.randn_like(y)
        x0_1, x0_2, h_1, h_2 = x0, x0_1, h, h_1
    return denoise(model, y, levels[-1], cond).x0
