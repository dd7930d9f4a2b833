"""The one-step regression baseline (SR3's)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffctl.denoiser import DiffusionModel
from diffctl.objectives.base import Objective
from diffctl.prediction import own_prediction
from diffctl.rng import BatchRandom


class RegressionObjective(Objective):
    """The one-step regressor (SR3's regression baseline): MSE of the x0 prediction to the target.

    The network is called only at t = T on a draw from the prior, x ~ N(0, prior_std^2), which is
    independent of x0, so the loss is minimized by E[x0 | cond] (the conditional mean). Sampling with
    sampler=ddim steps=1 starts from that same prior draw at T and returns this x0 prediction after
    one network call: the same network, conditioner and sample command as the diffusion model.
    """

    prediction = own_prediction("regression")

    def loss(self, model: DiffusionModel, x0: Tensor, cond: dict | None, rng: BatchRandom, **_) -> Tensor:
        t = torch.full((x0.shape[0],), self.sde.T, dtype=x0.dtype, device=x0.device)
        x = rng.randn(x0.shape, x0.dtype) * self.sde.prior_std()
        return (model(x, t, cond).x0 - x0).pow(2).flatten(1).mean(1).mean()
