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
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from diffctl.denoiser import Prediction
from diffctl.errors import ConfigError


@runtime_checkable
class NoiseClassifier(Protocol):
    """log p(y | x_t) for x_t [B, ...] at diffusion times t [B] (or a scalar): [B, num_classes],
    differentiable in x, each row depending on its own sample only (no batch statistics)."""

    num_classes: int

    def log_probs(self, x: Tensor, t: Tensor) -> Tensor: ...


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """A [B] (or scalar) tensor reshaped to broadcast against x [B, ...]."""
    v = v.expand(x.shape[0]) if v.ndim == 0 else v
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


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


def model_classes(model) -> int:
    """The number of classes a model is conditioned on (0: unconditional)."""
    return int(getattr(model, "num_classes", 0) or 0)


def check_classifier(model, classifier) -> None:
    """ConfigError unless `classifier` fits `model`: the protocol, its class count against a
    conditional model's, and the same SDE where both declare one."""
    if not isinstance(classifier, NoiseClassifier):
        raise ConfigError(f"a classifier needs num_classes and log_probs(x, t); got {type(classifier).__name__}")
    k = classifier.num_classes
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"the classifier's num_classes must be a positive integer, got {k!r}")
    if model_classes(model) and model_classes(model) != k:
        raise ConfigError(f"the classifier has {k} classes but the diffusion model is conditioned on {model_classes(model)}")
    mine, theirs = getattr(classifier, "sde", None), getattr(model, "sde", None)
    if mine is not None and theirs is not None and repr(mine) != repr(theirs):
        raise ConfigError(f"the classifier was made for {mine!r}, the diffusion model uses {theirs!r}")


def class_label(cond) -> Tensor | None:
    """cond["class_label"] (None when absent). A bare tensor is taken as the labels themselves:
    the positional labels of the samplers' (x, t, labels) calls."""
    if cond is None or isinstance(cond, Tensor):
        return cond
    if isinstance(cond, Mapping):
        return cond.get("class_label")
    raise ConfigError(f"cond must be a mapping such as {{'class_label': labels}}, got {type(cond).__name__}")


def _without_label(cond):
    """cond for a model that takes no class label: the other conditions, or None if none is left."""
    if not isinstance(cond, Mapping):
        return None
    rest = {k: v for k, v in cond.items() if k != "class_label"}
    return rest or None


class ClassifierGuided(nn.Module):
    """A model whose score is tilted by s grad log p(y | x_t) of a classifier (module docstring).

    model: `model(x, t, cond) -> Prediction` with `.sde`; every other attribute the samplers or
    commands read (`.sde`, `.prediction`, ...) is the wrapped model's. y is cond["class_label"] [B].
    uses_label: whether the wrapped model is itself class-conditional (default: it has num_classes
    > 0); when not, it gets cond without the class label. Combining with classifier-free guidance:
    - wrapped around a CFG model (recommended): score = CFG score + s grad log p(y | x);
    - wrapped inside one: the null-label rows (label = num_classes) get no gradient, so the result is
      CFG with weight w around (conditional score + s grad), an effective classifier scale w * s.
    classifier_calls counts classifier evaluations (one per guided call: a batched forward and
    backward), to be reported next to the network's NFE.
    """

    def __init__(self, model, classifier: NoiseClassifier, scale: float, uses_label: bool | None = None):
        super().__init__()
        scale = check_scale(scale)
        check_classifier(model, classifier)
        self.model = model
        self.classifier = classifier
        self.scale = scale
        self.uses_label = model_classes(model) > 0 if uses_label is None else bool(uses_label)
        self.classifier_calls = 0

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("model")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)

    @property
    def num_classes(self) -> int:
        """The labels this model takes: the classifier's classes (label num_classes is the null one)."""
        return self.classifier.num_classes

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Prediction:
        labels = class_label(cond)
        if labels is None:
            raise ConfigError("classifier guidance needs a class label per sample (cond['class_label'], class_label=k)")
        labels = check_labels(labels, self.num_classes, allow_null=True).to(x.device)
        pred = self.model(x, t, cond if self.uses_label else _without_label(cond))
        if self.scale == 0.0:
            return pred
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        grad = torch.zeros_like(x)
        guided = labels != self.num_classes
        if bool(guided.all()):
            grad = classifier_grad(self.classifier, x, t, labels)
        elif bool(guided.any()):
            grad[guided] = classifier_grad(self.classifier, x[guided], t[guided], labels[guided])
        self.classifier_calls += int(bool(guided.any()))
        alpha = _per_sample(self.sde.alpha(t.to(torch.float64)), x).to(x.dtype)
        # x0 from the wrapped x0, not (x - sigma eps_g) / alpha: the same in exact arithmetic, but it
        # keeps an x0-parameterized model's x0 as accurate as it was where alpha is tiny (VP near T).
        x0 = pred.x0 + (self.scale * pred.sigma * pred.sigma / alpha) * grad
        return Prediction(x0=x0, eps=pred.eps - self.scale * pred.sigma * grad, sigma=pred.sigma)
