"""DDIM (Song et al. 2021) with any eta, for every SDE.

It walks the noise levels of `noise_levels` in y = x/alpha, s = sigma/alpha variables (see common.py)
and ends by returning the x0 prediction at the last level.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffctl.samplers.common import SPACINGS, denoise, levels_of, noise_levels, start
from diffctl.samplers.registry import register_sampler
from diffctl.schema.rules import Choice, Float


@register_sampler("ddim", eta=Float(ge=0, le=1, hint="0 = deterministic DDIM, 1 = DDPM"), spacing=Choice(*SPACINGS))
@torch.inference_mode()
def ddim(model, x: Tensor, steps: int, cond=None, noise=None, *, eta: float = 0.0, spacing: str = "trailing") -> Tensor:
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
