"""Consistency sampling (Song et al. 2023), for consistency models only (`needs="one_step"`)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffctl.samplers.common import SPACINGS, Level, denoise, noise_levels, start
from diffctl.samplers.registry import register_sampler
from diffctl.schema.rules import Choice


@register_sampler("consistency", needs="one_step", spacing=Choice(*SPACINGS))
@torch.inference_mode()
def consistency(model, x: Tensor, steps: int, cond=None, noise=None, *, spacing: str = "karras") -> Tensor:
    """One evaluation at T, then steps-1 rounds that re-noise the x0 estimate to a lower level and
    map it back to x0. The levels are those of steps+1 levels without the last, which would re-noise
    by almost nothing."""
    sde = model.sde
    levels = [Level(sde, float(t)) for t in noise_levels(sde, steps + 1, spacing, t_end=sde.eps)[:-1]]
    s_min = Level(sde, sde.eps).s
    x0 = denoise(model, start(x, sde, levels[0]), levels[0], cond).x0
    for level in levels[1:]:
        y = x0 + (level.s**2 - s_min**2) ** 0.5 * noise.randn_like(x0)
        x0 = denoise(model, y, level, cond).x0
    return x0
