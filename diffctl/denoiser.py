"""The composed model every command and sampler talks to, and the wrappers that change its predictions.

A model is noise schedule (the SDE) + parameterization (diffctl/parameterization.py) + backbone
(U-Net, DiT: `net(c_in x, c_noise, class_labels)`) + conditioner (diffctl/conditioning.py). Its one
call is `model(x, t, cond) -> Prediction(x0, eps, sigma)` (also `model.denoise`), with x_t =
alpha(t) x0 + sigma(t) eps, t [B] or a scalar, cond a dict ({} unconditional). It declares what it
can do in `capabilities`, so commands ask it instead of testing types. The analytic mixture
(diffctl/networks/gmm.py: MixtureModel) implements the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffctl.conditioning import Conditioner, class_labels
from diffctl.parameterization import Parameterization, Prediction, split
from diffctl.sde import SDE, broadcast

__all__ = ["Capabilities", "ClippedModel", "DiffusionModel", "GuidedModel", "ModelWrapper", "Prediction"]


@dataclass(frozen=True)
class Capabilities:
    """What a model can do; commands check these instead of the model's type."""

    conditions: frozenset  # cond keys it reads (e.g. {"class_label"})
    num_classes: int  # classes of its class condition (0: none)
    null_condition: bool  # its null condition was trained (label dropout): classifier-free guidance works
    one_step: bool  # a consistency function: sampler=consistency only, no probability-flow ODE
    data_range: tuple[float, float] | None  # range of its data ((-1, 1): images); None: unbounded
    analytic: bool  # exact (model=gmm): no network; scored against its exact distribution
    prediction: str  # what the network outputs (eps | x0 | v | score | consistency | exact)

    @property
    def pf_ode(self) -> bool:
        """Whether it defines a probability-flow ODE (and so a likelihood)."""
        return not self.one_step

    @property
    def default_sampler(self) -> str:
        return "consistency" if self.one_step else "ode"


def _times(t: Tensor, x: Tensor) -> Tensor:
    t = t.to(x.dtype) if t.is_floating_point() else t.float()
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class DiffusionModel(nn.Module):
    """SDE + parameterization + backbone + conditioner. The backbone is `net` (its state-dict prefix)."""

    def __init__(self, net: nn.Module, sde: SDE, parameterization: Parameterization, conditioner: Conditioner | None = None,
                 data_range: tuple[float, float] | None = (-1.0, 1.0)):  # fmt: skip
        super().__init__()
        self.net, self.sde, self.parameterization = net, sde, parameterization
        self.conditioner = conditioner if conditioner is not None else Conditioner()
        self.data_range = data_range

    @property
    def capabilities(self) -> Capabilities:
        c = self.conditioner
        return Capabilities(conditions=c.keys, num_classes=c.num_classes, null_condition=c.dropout > 0,
                            one_step=self.parameterization.one_step, data_range=self.data_range, analytic=False,
                            prediction=self.parameterization.name)  # fmt: skip

    @property
    def backbone(self) -> nn.Module:
        return self.net

    def raw(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        """Network output F for x_t at times t [B] (no conversion)."""
        alpha, sigma = broadcast(self.sde.alpha(t), x), broadcast(self.sde.sigma(t), x)
        p = self.parameterization
        return self.net(self.conditioner.network_input(p.network_input(x, alpha, sigma), cond), p.c_noise(t), class_labels(cond))

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Prediction:
        t = _times(t, x)
        out = self.raw(x, t, cond).to(x.dtype)
        alpha, sigma = broadcast(self.sde.alpha(t), x), broadcast(self.sde.sigma(t), x)
        x0, eps = self.parameterization.predict(out, x, t, alpha, sigma)
        return Prediction(x0=x0, eps=eps, sigma=sigma)

    def denoise(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Prediction:
        return self(x, t, cond)


class ModelWrapper(nn.Module):
    """A model around a model: the protocol of the one inside, with its own predictions."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def sde(self) -> SDE:
        return self.inner.sde

    @property
    def conditioner(self) -> Conditioner:
        return self.inner.conditioner

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    @property
    def backbone(self):
        return self.inner.backbone

    def denoise(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Prediction:
        return self(x, t, cond)


class GuidedModel(ModelWrapper):
    """Classifier-free guidance (Ho & Salimans 2022) around a conditional model.

    D_w = D_null + w (D_cond - D_null), applied to x0 and eps alike (the weights sum to one, so
    x = alpha x0 + sigma eps still holds). w = 1 is the plain conditional model, w = 0 the
    unconditional one, w > 1 strengthens the condition (the `cfg_scale` of DiT and diffusers).
    Both halves run as one doubled batch, so one call is one network evaluation. The null
    condition is the conditioner's.
    """

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__(inner)
        self.scale = float(scale)

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Prediction:
        c = self.conditioner
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        both = self.inner(torch.cat([x, x]), torch.cat([t, t]), c.concat([cond, c.null(cond)]))
        (x0_c, x0_u), (eps_c, eps_u) = both.x0.chunk(2), both.eps.chunk(2)
        w = self.scale
        return Prediction(x0=x0_u + w * (x0_c - x0_u), eps=eps_u + w * (eps_c - eps_u), sigma=both.sigma[: x.shape[0]])


class ClippedModel(ModelWrapper):
    """Clip the x0 prediction to the data range and make eps agree with it (DDPM's clip_denoised,
    diffusers' clip_sample). The true E[x0 | x_t] of data in [lo, hi] lies in that range, so the
    clip can only move a prediction closer; it keeps deterministic samplers stable when the
    network is still poor at high noise, where x0 = (x - sigma eps)/alpha amplifies eps errors."""

    def __init__(self, inner: nn.Module, lo: float = -1.0, hi: float = 1.0):
        super().__init__(inner)
        self.lo, self.hi = lo, hi

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Prediction:
        pred = self.inner(x, t, cond)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        alpha = broadcast(self.sde.alpha(t.to(x.dtype)), x)
        x0, eps = split("x0", pred.x0.clamp(self.lo, self.hi), x, alpha, pred.sigma)
        return Prediction(x0=x0, eps=eps, sigma=pred.sigma)


def compose(net: nn.Module, sde: SDE, prediction: str = "eps", *, sigma_data: float = 0.5, scale_input: bool = True,
            num_classes: int | None = None, label_dropout: float = 0.0, conditioner: Conditioner | None = None,
            data_range: tuple[float, float] | None = (-1.0, 1.0)) -> DiffusionModel:  # fmt: skip
    """A DiffusionModel from its pieces by name: the network predicts `prediction` (eps | x0 | v |
    score | consistency); num_classes None takes the network's own (0: unconditional); a given
    conditioner (an image condition) replaces the class one; data_range None: unbounded data (latents)."""
    from diffctl.conditioning import make_conditioner
    from diffctl.parameterization import make_parameterization

    k = int(getattr(net, "num_classes", 0)) if num_classes is None else int(num_classes)
    if conditioner is None:
        conditioner = make_conditioner(k, label_dropout)
    return DiffusionModel(net, sde, make_parameterization(prediction, sde, sigma_data, scale_input), conditioner, data_range)
