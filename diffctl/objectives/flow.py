"""Flow matching: velocity regression along the SDE's path (rectified flow on sde=linear)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffctl.denoiser import DiffusionModel
from diffctl.objectives.base import Objective
from diffctl.parameterization import velocity
from diffctl.prediction import own_prediction
from diffctl.rng import BatchRandom
from diffctl.sde import SDE

TIME_SAMPLING = ("uniform", "logit_normal")


def flow_times(sde: SDE, rng: BatchRandom, n: int, sampling: str = "uniform", mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Training times in [eps, T]: t = eps + (T - eps) r with r ~ U[0, 1) (sampling=uniform) or
    r = sigmoid(mean + std n), n ~ N(0, 1) (logit_normal: SD3's density, Esser et al. 2024, which
    puts r in (0, 1)). Both are stratified over the global batch like objectives.base.sample_times:
    n = Phi^-1(u) of the stratified uniform u, so uniform draws the very same t as sample_times."""
    u = rng.stratified_uniform(n)
    if sampling == "logit_normal":
        u = torch.sigmoid(mean + std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0))
    return sde.eps + (sde.T - sde.eps) * u


class FlowObjective(Objective):
    """Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023): the MSE, per-sample mean
    over pixels, between the model's velocity u_hat = alpha' x0_hat + sigma' eps_hat and the path's
    u = alpha' x0 + sigma' eps at x_t = alpha x0 + sigma eps. On sde=linear u = eps - x0. The
    velocity is computed from the model's (x0, eps) (diffctl.parameterization.velocity), so any
    parameterization trains; its own is `flow` (the network outputs u). Minimized by
    E[u | x_t] = alpha' E[x0 | x_t] + sigma' E[eps | x_t]: the exact denoiser, i.e. the same
    probability-flow ODE every sampler integrates. Works on every SDE (vp, vpsub, ve, linear); on VE
    u = sigma' eps is large (sigma' = sigma log(sigma_max/sigma_min)), so the loss is too.
    """

    prediction = own_prediction("flow")

    def __init__(self, sde: SDE, time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0):
        super().__init__(sde)
        if time_sampling not in TIME_SAMPLING:
            raise ValueError(f"objective.time_sampling must be uniform or logit_normal, got {time_sampling!r}")
        if not float(logit_std) > 0:
            raise ValueError(f"objective.logit_std must be > 0, got {logit_std}")
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, float(logit_mean), float(logit_std)

    def times(self, rng: BatchRandom, n: int) -> Tensor:
        return flow_times(self.sde, rng, n, self.time_sampling, self.logit_mean, self.logit_std)

    def loss(self, model: DiffusionModel, x0: Tensor, cond: dict | None, rng: BatchRandom, **_) -> Tensor:
        t = self.times(rng, x0.shape[0]).to(x0.dtype)
        return self.velocity_loss(model, x0, rng.randn(x0.shape, x0.dtype), t, cond)

    def velocity_loss(self, model: DiffusionModel, x0: Tensor, noise: Tensor, t: Tensor, cond: dict | None) -> Tensor:
        """The loss at x_t = alpha x0 + sigma noise: the per-sample mean squared velocity error, batch mean."""
        pred = model(self.sde.marginal(x0, t, noise), t, cond)
        target = velocity(self.sde, t, x0, noise)
        return (velocity(self.sde, t, pred.x0, pred.eps) - target).pow(2).flatten(1).mean(1).mean()
