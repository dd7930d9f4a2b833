"""The denoising losses: DDPM's epsilon MSE and NCSN's denoising score matching."""

from __future__ import annotations

from torch import Tensor

from diffctl.denoiser import DiffusionModel
from diffctl.objectives.base import Objective, sample_times
from diffctl.prediction import own_prediction
from diffctl.rng import BatchRandom
from diffctl.sde import SDE, broadcast

WEIGHTINGS = ("simple", "likelihood", "min_snr")
MIN_SNR_GAMMA = 5.0  # Hang et al. 2023's gamma


class DDPMObjective(Objective):
    """epsilon-prediction MSE (Ho et al.'s "simple" loss) at continuous t.

    weighting="likelihood" multiplies by g(t)^2 / sigma(t)^2, which turns the loss into the
    score-matching bound on negative log-likelihood (Song et al. 2021, "likelihood weighting").
    The loss stays in eps-space, so any parameterization of the network trains (denoiser.prediction).

    weighting="min_snr": Min-SNR-gamma (Hang et al. 2023), min(SNR, gamma) ||x0_hat - x0||^2 with
    SNR = alpha^2/sigma^2 and gamma = snr_gamma (null: the paper's 5). For one x_t = alpha x0 + sigma eps =
    alpha x0_hat + sigma eps_hat the errors are proportional: alpha dx0 + sigma deps = 0, so
    ||deps||^2 = SNR ||dx0||^2, and with v = alpha eps - sigma x0, dv = -(alpha^2 + sigma^2)/sigma dx0.
    The one loss is therefore, in each space,
        x0:  min(SNR, gamma) ||dx0||^2
        eps: min(SNR, gamma)/SNR ||deps||^2                        (what is computed here)
        v:   min(SNR, gamma) sigma^2/(alpha^2 + sigma^2)^2 ||dv||^2 = min(SNR, gamma)/(SNR + 1) ||dv||^2 on VP,
    the paper's weights for x0, eps and v targets; min(SNR, gamma)/SNR on a v error (an old diffusers
    bug) is another loss. Being one function of the network output whatever space it is written in, it
    needs no knob for the target space: any parameterization trains with it and gets the paper's loss.
    `prediction` (eps, x0 or v; None: not given) is the key older configs and checkpoints name it
    with; the model reads it from the config (diffctl.prediction.model_prediction), not from here.
    """

    prediction = own_prediction("ddpm")

    def __init__(self, sde: SDE, weighting: str = "simple", prediction: str | None = None, snr_gamma: float | None = None):
        super().__init__(sde)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"objective.weighting must be 'simple', 'likelihood' or 'min_snr', got {weighting!r}")
        if prediction not in (None, "eps", "x0", "v"):
            raise ValueError(f"objective.prediction for ddpm must be null, eps, x0 or v, got {prediction!r}")
        if snr_gamma is not None and weighting != "min_snr":
            raise ValueError(f"objective.snr_gamma is read with objective.weighting=min_snr only (weighting is {weighting}): leave it null")
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"objective.snr_gamma must be > 0, got {snr_gamma}")
        self.weighting = weighting
        self.snr_gamma = MIN_SNR_GAMMA if snr_gamma is None else float(snr_gamma)

    def weight(self, t: Tensor) -> Tensor:
        """The weight of the per-sample eps-MSE at times t [B]."""
        if self.weighting == "likelihood":
            return (self.sde.diffusion(t) / self.sde.sigma(t)) ** 2
        snr = (self.sde.alpha(t) / self.sde.sigma(t)) ** 2
        return snr.clamp(max=self.snr_gamma) / snr

    def loss(self, model: DiffusionModel, x0: Tensor, cond: dict | None, rng: BatchRandom, **_) -> Tensor:
        t = sample_times(self.sde, rng, x0.shape[0]).to(x0.dtype)
        noise = rng.randn(x0.shape, x0.dtype)
        pred = model(self.sde.marginal(x0, t, noise), t, cond)
        per_sample = (pred.eps - noise).pow(2).flatten(1).mean(1)
        if self.weighting != "simple":
            per_sample = per_sample * self.weight(t)
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
