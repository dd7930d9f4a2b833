"""Inpainting with an unconditional (or class-conditional) diffusion model, without retraining:
RePaint (Lugmayr et al. 2022) and the plain replacement method it improves on.

Everything runs in the samplers' variables y = x / alpha, s = sigma / alpha (diffctl/samplers/common.py),
in which every SDE (VP, sub-VP, VE) is the VE process y_s = x0 + s eps:
- the known region at level s is a fresh forward draw y_k = x_known + s z (q(y_s | x0) in y);
- a reverse step from s to s' < s is the ancestral (DDPM) step: y' ~ q(y_s' | y_s, x0 = predicted x0),
  the posterior N(r y + (1 - r) x0, s'^2 (1 - r)), r = (s'/s)^2 (DDPM's beta-tilde for VP, the SMLD
  ancestral step for VE);
- a jump back from s' to s > s' is the forward transition q(y_s | y_s'): y = y' + sqrt(s^2 - s'^2) z.
  In x this is x_t = (alpha_t/alpha_t') x_t' + sqrt(sigma_t^2 - (alpha_t/alpha_t')^2 sigma_t'^2) z, i.e.
  DDPM's sqrt(1 - beta) x + sqrt(beta) z for VP and x + sqrt(sigma_t^2 - sigma_t'^2) z for VE.

Before every network call the known region is replaced by its forward draw at that level; the result
is the x0 prediction at the last level with the known region put back exactly (bitwise the input).
Noise comes from the per-sample source (diffctl.noise), one draw per event in a fixed order (start,
then per visited level: the known region's draw, then the step's draw), so sample i depends only on
(seed, i), not on the batch it is in.

RePaint is not an exact conditional sampler: the unconditional reverse step sees a noisy known region
instead of x_known, and its resampling (jumps) only lets the unknown region re-adjust to it (in the
limit of small jumps, Langevin dynamics with the score averaged over the known region's noise). With
enough resampling it comes close when the conditional's modes overlap; plain replacement (no jumps) is
clearly biased; with well-separated modes both get the mode weights wrong (tests/test_inpaint.py tests the
first two against the exact conditional of a Gaussian mixture, diffctl/mixture_conditional.py, and records
the measurement of the third).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffctl.errors import ConfigError
from diffctl.noise import NOISE_VERSION, sample_noise
from diffctl.samplers.common import SPACINGS, Level, denoise, levels_of, noise_levels, start

METHODS = ("repaint", "replace")


def jump_schedule(steps: int, jump_length: int = 10, resample: int = 10) -> list[int]:
    """The levels RePaint visits, as indices into `steps` noise levels (0 = the highest), from 0 to
    steps - 1. The paper's schedule (its Fig. 9-10, `get_schedule_jump` of andreas128/RePaint with
    the extra jump2/jump3 levels off): counting levels from the bottom (u = steps - 1 - index), at every
    u in 0, j, 2j, ... below steps - j the walk goes back up j levels, resample - 1 times, so the
    stretch above each such level is traversed `resample` times. resample = 1 is plain replacement."""
    _check_schedule(steps, jump_length, resample)
    left = {u: resample - 1 for u in range(0, steps - jump_length, jump_length)}
    u, path = steps - 1, [steps - 1]
    while u > 0:
        u -= 1
        path.append(u)
        if left.get(u, 0) > 0:
            left[u] -= 1
            for _ in range(jump_length):
                u += 1
                path.append(u)
    return [steps - 1 - u for u in path]


def schedule_nfe(path: list[int]) -> int:
    """Network evaluations per sample of a path: one at every level followed by a step down, one
    for the final x0 prediction; a jump up costs none."""
    return sum(1 for a, b in zip(path, path[1:]) if b > a) + 1


def _check_schedule(steps: int, jump_length: int, resample: int) -> None:
    for name, v in (("steps", steps), ("jump_length", jump_length), ("resample", resample)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if resample > 1 and jump_length >= steps:
        raise ConfigError(f"jump_length={jump_length} must be below steps={steps} to jump back (or set resample=1)")


def _posterior_step(y: Tensor, x0: Tensor, now: Level, nxt: Level, z: Tensor) -> Tensor:
    """A draw of q(y_s' | y_s, x0) of the VE process in y (DDPM's posterior with beta-tilde for VP);
    stochastic.py's own helper is private to it."""
    r = (nxt.s / now.s) ** 2
    return r * y + (1.0 - r) * x0 + nxt.s * math.sqrt(1.0 - r) * z


def _keep_mask(mask: Tensor, x: Tensor) -> Tensor:
    """mask (1 = known) broadcast to x as booleans; refuses values other than 0 and 1."""
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ConfigError("an inpainting mask must hold only 0 (to inpaint) and 1 (known)")
    try:
        return torch.broadcast_to(mask.to(x.device) == 1, x.shape)
    except RuntimeError:
        raise ConfigError(f"mask of shape {list(mask.shape)} does not broadcast to the images' {list(x.shape)}") from None


@torch.inference_mode()
def repaint(model, x: Tensor, steps: int, known: Tensor, mask: Tensor, cond=None, noise=None,
            jump_length: int = 10, resample: int = 10, spacing: str = "trailing") -> tuple[Tensor, int]:  # fmt: skip
    """RePaint from the prior draw x (as a sampler gets it). known: the images (only the masked-in
    part is used); mask: 1 = known, broadcastable to x. Returns (result, NFE per sample); the
    result's known pixels are `known`'s exactly. `cond` goes to the model untouched."""
    if spacing not in SPACINGS:
        raise ConfigError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    path = jump_schedule(steps, jump_length, resample)
    keep = _keep_mask(mask, x)
    known = known.to(device=x.device, dtype=x.dtype)
    levels = levels_of(model.sde, noise_levels(model.sde, steps, spacing))
    if len(levels) != steps:  # quadratic spacing drops repeated timesteps; the schedule counts levels
        raise ConfigError(f"spacing={spacing} gives {len(levels)} levels for steps={steps}; use another spacing")
    y, nfe = start(x, model.sde, levels[path[0]]), 0
    for a, b in zip(path, path[1:] + [None]):
        now = levels[a]
        if b is not None and b < a:  # a jump back up: forward noise, the known region is redrawn before the next call
            y = y + math.sqrt(levels[b].s ** 2 - now.s**2) * noise.randn_like(y)
            continue
        y = torch.where(keep, known + now.s * noise.randn_like(y), y)
        x0 = denoise(model, y, now, cond).x0
        nfe += 1
        if b is None:
            return torch.where(keep, known, x0), nfe
        y = _posterior_step(y, x0, now, levels[b], noise.randn_like(y))
    raise AssertionError("unreachable: the path ends at its last level")


@dataclass
class InpaintResult:
    images: Tensor  # float, the model's data range, known region = the input exactly
    nfe: int  # network evaluations per sample


def inpaint(model, known: Tensor, mask: Tensor, steps: int, method: str = "repaint", seed: int = 0,
            first_index: int = 0, cond=None, jump_length: int = 10, resample: int = 10,
            spacing: str = "trailing", device=None, noise_version: int = NOISE_VERSION) -> InpaintResult:  # fmt: skip
    """Inpaint samples first_index .. first_index + len(known) - 1 of `seed`: known [N, ...] images,
    mask [N or 1, 1 or C, ...] (1 = known). method=replace is RePaint without resampling (resample = 1,
    whatever resample says). Draw 0 of each sample is its start noise, as in samplers.generate."""
    if method not in METHODS:
        raise ConfigError(f"unknown inpainting method {method!r}; choose one of {', '.join(METHODS)}")
    caps = getattr(model, "capabilities", None)
    if caps is not None and caps.one_step:  # its output at a level is not a posterior mean E[x0 | x_t]
        raise ConfigError("inpainting needs a diffusion model; a consistency model (one step) cannot run RePaint's chain")
    if method == "replace":
        resample = 1
    _check_schedule(steps, jump_length, resample)
    num, device = known.shape[0], known.device if device is None else device
    noise = sample_noise(seed, range(first_index, first_index + num), device, noise_version)
    x = model.sde.prior_std() * noise.randn(known.shape[1:], device=device)
    x = x.to(known.dtype) if known.dtype == torch.float64 else x
    out, nfe = repaint(model, x, steps, known.to(x.device), mask, cond, noise, jump_length, resample, spacing)
    return InpaintResult(out, nfe)
