"""The denoising losses: DDPM's epsilon MSE and NCSN's denoising score matching."""

from __future__ import annotations

from torch import Tensor

from diffctl.denoiser import DiffusionModel
from diffctl.objectives.base import Objective, sample_times
from diffctl.prediction import own_prediction
from diffctl.rng import BatchRandom
from diffctl.sde import SDE, broadcast


class DDPMObjective(Objective):
    """epsilon-prediction MSE (Ho et al.'s "simple" loss) at continuous t.

    weighting="likelihood" multiplies by g(t)^2 / sigma(t)^2, which turns the loss into the
    score-matching bound on negative log-likelihood (Song et al. 2021, "likelihood weighting").
    The loss stays in eps-space, so any parameterization of the network trains (denoiser.prediction).
    `prediction` (eps, x0 or v; None: not given) is the key older configs and checkpoints name it
    with; the model reads it from the config (diffctl.prediction.model_prediction), not from here.
    """

    prediction = own_prediction("ddpm")

    def __init__(self, sde: SDE, weighting: str = "simple", prediction: str | None = None):
        super().__init__(sde)
        if weighting not in ("simple", "likelihood"):
            raise ValueError(f"objective.weighting must be 'simple' or 'likelihood', got {weighting!r}")
        if prediction not in (None, "eps", "x0", "v"):
            raise ValueError(f"objective.prediction for ddpm must be null, eps, x0 or v, got {prediction!r}")
        self.weighting = weighting

    def loss(self, model: DiffusionModel, x0: Tensor, cond: dict | None, rng: BatchRandom, **_) -> Tensor:
        t = sample_times(self.sde, rng, x0.shape[0]).to(x0.dtype)
        noise = rng.randn(x0.shape, x0.dtype)
        pred = model(self.sde.marginal(x0, t, noise), t, cond)
        per_sample = (pred.eps - noise).pow(2).flatten(1).mean(1)
        if self.weighting == "likelihood":
            per_sample = per_sample * (self.sde.diffusion(t) / self.sde.sigma(t)) ** 2
        return per_sample.mean()


class NCSNObjective(Objective):
    """Denoising score matching, lambda(sigma) = sigma^2 (Song & Ermon 2019; any SDE).

    sigma^2 || s(x_t) - grad log p(x_t | x0) ||^2 with grad log p = -noise/sigma, i.e. || sigma s + noise ||^2.
    """

    prediction = own_prediction("ncsn")

    def loss(self, model: DiffusionModel, x0: Tensor, cond: dict | None, rng: BatchRandom, **_) -> Tensor:
        t = sample_times(self.sde, rng, x0.shape[0]).to(x0.dtype)
        noise = rng.randn(x0.shape, x0.dtype)
        pred = model(self.sde.marginal(x0, t, noise), t, cond)
        sigma = broadcast(self.sde.sigma(t), x0)
        return (sigma * pred.score + noise).pow(2).flatten(1).mean(1).mean()
