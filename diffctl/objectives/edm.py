"""EDM's training recipe (Karras et al. 2022, "Elucidating the design space...", Table 1 and section 5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffctl.denoiser import DiffusionModel
from diffctl.objectives.base import Objective
from diffctl.prediction import own_prediction
from diffctl.rng import BatchRandom
from diffctl.sde import SDE


class EDMObjective(Objective):
    """EDM's loss: ln s ~ N(p_mean, p_std^2), lambda(s) ||x0_hat - x0||^2 with lambda = (s^2 + sd^2)/(s sd)^2.

    Every SDE here is, in y = x/alpha and s = sigma/alpha, the VE process y = x0 + s eps, and s is EDM's
    sigma. A drawn s is clamped into [s(eps), s(T)] of the run's SDE (the levels its times cover) and
    mapped to t = sde.t_from_noise_ratio(s); the weight uses the s of that t, the one the model sees.
    Clamped, of 10^6 draws with the paper's p_mean = -1.2, p_std = 1.2 (conf/sde defaults): sde=vp
    (s in [1.0e-3, 152]) and vpsub 1 draw (high end); sde=ve (sigma_min 0.02: ln 0.02 is 2.26 p_std below
    p_mean) 1.20% at the low end, and at the high end 0.18% with sigma_max 10 (data=digits), 0.0007% with
    50 (mnist), 0.0001% with 100 (cifar10).

    The loss is on x0 through the model's conversions, so it trains every parameterization of
    diffctl.prediction.DENOISING. With the edm one (its own) lambda c_out^2 = 1, so it is the unit-weight
    MSE of the network output F against EDM's effective target (y0 - c_skip y)/c_out. Per-sample means
    over pixels (EDM sums over pixels: a constant factor). sigma_data: conf/objective/edm.yaml takes it
    from denoiser.sigma_data, the one the preconditioning uses.
    """

    prediction = own_prediction("edm")

    def __init__(self, sde: SDE, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        super().__init__(sde)
        if not p_std > 0 or not sigma_data > 0 or not math.isfinite(p_mean):
            raise ValueError(f"objective=edm needs a finite p_mean, p_std > 0 and sigma_data > 0, got {p_mean}, {p_std}, {sigma_data}")
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)

    def ratio_range(self) -> tuple[float, float]:
        """[s(eps), s(T)]: the noise ratios the SDE's training times cover."""
        ends = torch.tensor([self.sde.eps, self.sde.T], dtype=torch.float64)
        lo, hi = self.sde.noise_ratio(ends).tolist()
        return lo, hi

    def noise_ratios(self, rng: BatchRandom, n: int) -> Tensor:
        """s = exp(p_mean + p_std z), z the rng's keyed normals (one per sample of the global batch), float64,
        before clamping."""
        z = rng.randn((n,), torch.float64)
        return torch.exp(self.p_mean + self.p_std * z)

    def times(self, s: Tensor) -> Tensor:
        lo, hi = self.ratio_range()
        return self.sde.t_from_noise_ratio(s.clamp(lo, hi)).clamp(self.sde.eps, self.sde.T)

    def weight(self, s: Tensor) -> Tensor:
        """lambda(s) = (s^2 + sd^2)/(s sd)^2 = 1/c_out(s)^2."""
        sd2 = self.sigma_data**2
        return (s * s + sd2) / (s * s * sd2)

    def loss(self, model: DiffusionModel, x0: Tensor, cond: dict | None, rng: BatchRandom, **_) -> Tensor:
        t = self.times(self.noise_ratios(rng, x0.shape[0])).to(x0.dtype)
        noise = rng.randn(x0.shape, x0.dtype)
        pred = model(self.sde.marginal(x0, t, noise), t, cond)
        per_sample = (pred.x0 - x0).pow(2).flatten(1).mean(1)
        return (self.weight(self.sde.noise_ratio(t)) * per_sample).mean()
