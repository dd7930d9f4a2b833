"""Classifier guidance (Dhariwal & Nichol 2021; Song et al. 2021, eq. 5.1-5.2 of the seed notes).

A noise-conditional classifier p(y | x_t) tilts the model's score:
    score_g(x, t) = grad log p_t(x) + s grad log p_t(y | x) = grad log [p_t(x) p_t(y | x)^s],
i.e. in the eps parameterization (score = -eps / sigma)
    eps_g = eps - s sigma grad,   x0_g = (x - sigma eps_g) / alpha = x0 + s sigma^2 / alpha grad.
At s = 1 the tilted density is p_t(x) p_t(y | x) = p(y) p_t(x | y): exactly the class-conditional
marginal at every noise level, so any sampler then samples p(x | y). At s != 1 it is the tilted
p_t(x) p_t(y | x)^s at each level t, but those tilted marginals are not the diffusion of the tilted data
density p_0(x) p_0(y | x)^s, so a plain reverse-SDE/ODE pass does not sample that density exactly
(Bradley & Nakkiran 2024); tests/test_classifier_guidance.py measures how far off it is.

The classifier protocol (`NoiseClassifier`) is what the exact mixture posterior and a trained
classifier share: `num_classes` and `log_probs(x, t) -> [B, K]`, differentiable in x.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from diffctl.conditioning import CLASS_LABEL, ClassConditioner, Conditioner, class_labels
from diffctl.denoiser import Capabilities, ModelWrapper, Prediction
from diffctl.errors import ConfigError
from diffctl.sde import broadcast


@runtime_checkable
class NoiseClassifier(Protocol):
    """log p(y | x_t) for x_t [B, ...] at diffusion times t [B] (or a scalar): [B, num_classes],
    differentiable in x, each row depending on its own sample only (no batch statistics)."""

    num_classes: int

    def log_probs(self, x: Tensor, t: Tensor) -> Tensor: ...


class ExactMixtureClassifier:
    """The exact classifier of a GaussianMixture under an SDE: p(k | x_t), the posterior of the
    component given x_t = alpha(t) x0 + sigma(t) eps (`classifier=exact` for model=gmm).

    x_t | k ~ N(alpha mu_k, C_k) with C_k = alpha^2 Sigma_k + sigma^2 I, so
        log p(k | x_t) = log w_k + log N(x_t; alpha mu_k, C_k) - logsumexp_j(same for j),
        grad_x log p(k | x_t) = s_k(x) - sum_j p(j | x_t) s_j(x),  s_j(x) = -C_j^-1 (x - alpha mu_j).
    Computed in float64 in the eigenbasis of each Sigma_k (C_k shares it). Its own copies of the
    mixture's tensors are made outside inference mode, so autograd can pass through them even when
    the mixture itself was moved to a device under torch.inference_mode.
    """

    def __init__(self, mixture, sde):
        self.sde = sde
        self.shape = tuple(mixture.shape)
        self.num_classes = int(mixture.num_components)
        with torch.inference_mode(False):
            variances, basis = torch.linalg.eigh(mixture.covariances().detach().cpu().clone())
            self._cpu = (mixture.means.detach().cpu().clone(), basis, variances, mixture.log_weights.detach().cpu().clone())
        self._on = {torch.device("cpu"): self._cpu}

    def _tensors(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if device not in self._on:
            with torch.inference_mode(False):  # normal tensors, usable by autograd later
                self._on[device] = tuple(v.to(device) for v in self._cpu)
        return self._on[device]

    def _components(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(log w_k + log N(x; alpha mu_k, C_k) [B, K], offsets U_k^T (x - alpha mu_k) [B, K, D],
        eigenvalues of C_k [B, K, D], eigenbases [K, D, D]) for flattened float64 x."""
        means, basis, variances, log_w = self._tensors(x.device)
        t = torch.as_tensor(t, device=x.device).to(torch.float64)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        a, s = self.sde.alpha(t)[:, None, None], self.sde.sigma(t)[:, None, None]
        z = torch.einsum("bkd,kde->bke", x[:, None, :] - a * means[None], basis)
        var = a * a * variances[None] + s * s
        log_n = -0.5 * (z * z / var + torch.log(2 * math.pi * var)).sum(-1)
        return log_w[None] + log_n, z, var, basis

    def _flat(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        if flat.shape[1] != self._cpu[0].shape[1]:
            raise ConfigError(f"the exact classifier is for samples of shape {list(self.shape)}, got {list(x.shape[1:])}")
        return flat

    def log_probs(self, x: Tensor, t: Tensor) -> Tensor:
        """log p(k | x_t) [B, K], float64."""
        return torch.log_softmax(self._components(self._flat(x), t)[0], dim=1)

    def grad_log_prob(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """grad_x log p(labels | x_t) in closed form (no autograd), float64, shaped like x."""
        joint, z, var, basis = self._components(self._flat(x), t)
        r = torch.softmax(joint, dim=1)
        scores = torch.einsum("kde,bke->bkd", basis, -z / var)  # s_j(x) = -C_j^-1 (x - alpha mu_j)
        own = scores[torch.arange(x.shape[0], device=x.device), labels.to(x.device).long()]
        return (own - (r[:, :, None] * scores).sum(1)).reshape(x.shape)


def classifier_grad(classifier: NoiseClassifier, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
    """grad_x log p(labels_i | x_i at t_i) per sample, by autograd through `classifier.log_probs`,
    in x's dtype. Summing the picked log-probabilities over the batch before differentiating gives
    each sample its own gradient because a row depends on its own sample only (the protocol).
    Works when called under torch.inference_mode (the samplers are): gradients are switched back on
    and the inputs cloned, as an inference tensor cannot take part in autograd."""
    t = torch.as_tensor(t, device=x.device)
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        tt = t.detach().clone().expand(x.shape[0]) if t.ndim == 0 else t.detach().clone()
        idx = labels.detach().clone().to(x.device).long()
        logp = classifier.log_probs(xg, tt)
        (grad,) = torch.autograd.grad(logp.gather(1, idx[:, None]).sum(), xg)
    return grad.detach().to(x.dtype)


def check_scale(scale) -> float:
    """The classifier scale as a float; ConfigError unless a finite number >= 0."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ConfigError(f"classifier_scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


def check_labels(labels, num_classes: int, allow_null: bool = False) -> Tensor:
    """Class labels as a LongTensor [B]; ConfigError unless integers in 0..num_classes-1 (allow_null:
    num_classes too, the null condition of classifier-free guidance, which gets no gradient)."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.ndim != 1:
        raise ConfigError(f"class_label must be one integer per sample, got a {labels.dtype} tensor of shape {list(labels.shape)}")
    top = num_classes if allow_null else num_classes - 1
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > top):
        bad = labels[(labels < 0) | (labels > top)][0]
        raise ConfigError(f"class_label must be in 0..{num_classes - 1} (the classifier's classes), got {int(bad)}")
    return labels.long()


def check_classifier(model, classifier) -> None:
    """ConfigError unless `classifier` can guide `model`: the protocol, a model with a score (not a
    one-step consistency model), the class count of a class-conditional model, the same SDE where
    the classifier declares one (a trained classifier learned p(y | x_t) under one SDE's noise)."""
    if not isinstance(classifier, NoiseClassifier):
        raise ConfigError(f"a classifier needs num_classes and log_probs(x, t); got {type(classifier).__name__}")
    k = classifier.num_classes
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"the classifier's num_classes must be a positive integer, got {k!r}")
    can = model.capabilities
    if can.one_step:
        raise ConfigError("classifier guidance needs a model with a score; a consistency model has none (one-step only)")
    if CLASS_LABEL in can.conditions and can.num_classes != k:
        raise ConfigError(f"the classifier has {k} classes but the diffusion model is conditioned on {can.num_classes}")
    mine = getattr(classifier, "sde", None)
    if mine is not None and repr(mine) != repr(model.sde):
        raise ConfigError(f"the classifier was made for {mine!r}, the diffusion model uses {model.sde!r}")


class ClassifierGuided(ModelWrapper):
    """A model whose score is tilted by s grad log p(y | x_t) of a classifier (module docstring).

    inner: any model of the protocol (`inner(x, t, cond) -> Prediction`, `.sde`, `.capabilities`);
    y is cond["class_label"] [B]. A class-conditional inner model gets cond as it is; an
    unconditional one gets cond without the class label. The wrapper takes class labels either way:
    its conditioner is the inner one's, or a ClassConditioner over the classifier's classes, whose
    null label K means "no guidance" (the unconditional model). Combining with classifier-free
    guidance (diffctl.denoiser.GuidedModel):
    - around a GuidedModel(w) (recommended): score = CFG score + s grad log p(y | x_t);
    - inside one: the null half gets no gradient, so the result is CFG with weight w around
      (conditional score + s grad): an effective classifier scale w * s.
    classifier_calls counts classifier evaluations (one per guided call: a batched forward and
    backward) for the NFE report, next to the network calls a forward hook on the inner model counts.
    """

    def __init__(self, inner: nn.Module, classifier: NoiseClassifier, scale: float):
        super().__init__(inner)
        self.scale = check_scale(scale)
        check_classifier(inner, classifier)
        self.classifier = classifier
        self.classifier_calls = 0
        can = inner.capabilities
        self._inner_takes_label = CLASS_LABEL in can.conditions
        self._conditioner = inner.conditioner if self._inner_takes_label else ClassConditioner(classifier.num_classes)

    @property
    def conditioner(self) -> Conditioner:
        return self._conditioner

    @property
    def capabilities(self) -> Capabilities:
        can = self.inner.capabilities
        if self._inner_takes_label:
            return can
        # an unconditional model: the null label is the model itself, exact, hence always "trained"
        return replace(can, conditions=can.conditions | {CLASS_LABEL}, num_classes=self.classifier.num_classes, null_condition=True)

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Prediction:
        labels = class_labels(cond)
        if labels is None:
            raise ConfigError("classifier guidance needs a class label per sample (cond['class_label'], class_label=k)")
        k = self.classifier.num_classes
        labels = check_labels(labels, k, allow_null=True).to(x.device)
        inner_cond = cond if self._inner_takes_label else {key: v for key, v in cond.items() if key != CLASS_LABEL}
        pred = self.inner(x, t, inner_cond)
        guided = labels != k
        if self.scale == 0.0 or not bool(guided.any()):
            return pred
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if bool(guided.all()):
            grad = classifier_grad(self.classifier, x, t, labels)
        else:  # the null rows of classifier-free guidance's doubled batch: no classifier call for them
            grad = torch.zeros_like(x)
            grad[guided] = classifier_grad(self.classifier, x[guided], t[guided], labels[guided])
        self.classifier_calls += 1
        alpha = broadcast(self.sde.alpha(t.to(torch.float64)), x).to(x.dtype)
        # x0 from the wrapped x0, not (x - sigma eps_g) / alpha: the same in exact arithmetic, but it
        # keeps an x0-parameterized model's x0 as accurate as it was where alpha is tiny (VP near T).
        x0 = pred.x0 + (self.scale * pred.sigma * pred.sigma / alpha) * grad
        return Prediction(x0=x0, eps=pred.eps - self.scale * pred.sigma * grad, sigma=pred.sigma)
