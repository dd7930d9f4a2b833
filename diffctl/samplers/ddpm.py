"""DDPM's ancestral sampler (Ho et al. 2020), for every SDE (SMLD's ancestral rule for VE).

It walks the noise levels of `noise_levels` in y = x/alpha, s = sigma/alpha variables (see common.py)
and ends by returning the x0 prediction at the last level.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffctl.samplers.common import SPACINGS, VARIANCES, ancestral_step, denoise, levels_of, noise_levels, start
from diffctl.samplers.registry import register_sampler
from diffctl.schema.rules import Choice


@register_sampler("ddpm", variance=Choice(*VARIANCES), spacing=Choice(*SPACINGS))
@torch.inference_mode()
def ddpm(model, x: Tensor, steps: int, cond=None, noise=None, *, variance: str = "small", spacing: str = "trailing") -> Tensor:
    """Ancestral sampling: draw x_s ~ q(x_s | x_t, x0 = predicted x0) level by level (Ho et al. 2020),
    with the posterior's variance (variance=small) or the forward step's (variance=large)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    levels = levels_of(model.sde, noise_levels(model.sde, steps, spacing))
    y = start(x, model.sde, levels[0])
    for now, nxt in zip(levels, levels[1:]):
        y = ancestral_step(y, denoise(model, y, now, cond).x0, now, nxt, variance, noise)
    return denoise(model, y, levels[-1], cond).x0
