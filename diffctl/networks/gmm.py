"""`model=gmm`: an analytic model. The data is a Gaussian mixture; under every SDE its noised marginal
x_t = alpha x0 + sigma z is again a Gaussian mixture, so E[x0 | x_t], eps, the score and the
log-density are closed-form at every noise level. It needs no training: it is the denoiser a
perfectly trained network would be, which makes it ground truth for samplers and likelihoods.

Component k is N(mu_k, Sigma_k) with Sigma_k = U_k diag(lambda_k) U_k^T. At (alpha, sigma):
    x_t | k ~ N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)
    E[x0 | x_t, k] = mu_k + U_k diag(alpha lambda_k / (alpha^2 lambda_k + sigma^2)) U_k^T (x_t - alpha mu_k)
and E[x0 | x_t] weighs these by the posterior component probabilities. Everything is float64.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from diffctl.conditioning import ClassConditioner, Conditioner, class_labels
from diffctl.denoiser import Capabilities, Prediction
from diffctl.errors import ConfigError
from diffctl.filekinds import identify
from diffctl.sde import SDE, broadcast

# Keys of conf/model/gmm.yaml (and of a mixture file).
CONFIG_KEYS = ("shape", "num_components", "means", "mean_scale", "scales", "covariances", "weights", "seed", "conditional", "file")


class GaussianMixture:
    """sum_k w_k N(mu_k, Sigma_k) over samples of `shape` (flattened to D = prod(shape) dimensions).

    means [K, D]; covariances [K, D, D] (symmetric positive definite) or, instead, scales: one std for
    all, one per component [K], or one per component and dimension [K, D] (diagonal covariances).
    """

    def __init__(self, means, scales=None, covariances=None, weights=None, shape: Sequence[int] | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2 or means.shape[0] < 1:
            raise ValueError(f"means must be a K x D list (one mean per component), got shape {list(means.shape)}")
        K, D = means.shape
        self.means = means
        self.shape = tuple(int(s) for s in (shape if shape is not None else (D,)))
        if math.prod(self.shape) != D:
            raise ValueError(f"shape {list(self.shape)} has {math.prod(self.shape)} elements but the means have D={D}")
        if covariances is not None:
            if scales is not None:
                raise ValueError("give either scales or covariances, not both")
            cov = torch.as_tensor(covariances, dtype=torch.float64)
            if cov.shape != (K, D, D):
                raise ValueError(f"covariances must be K x D x D = {K} x {D} x {D}, got {list(cov.shape)}")
            if not torch.allclose(cov, cov.transpose(1, 2)):
                raise ValueError("covariances must be symmetric")
            self.variances, self.basis = torch.linalg.eigh(cov)  # Sigma_k = U diag(lambda) U^T
            if not bool((self.variances > 0).all()):
                raise ValueError("covariances must be positive definite (an eigenvalue is <= 0)")
        else:
            std = torch.as_tensor(1.0 if scales is None else scales, dtype=torch.float64)
            if std.ndim == 1 and std.shape[0] not in (K,):
                raise ValueError(f"scales must be one number, K={K} numbers or a K x D list, got {std.shape[0]} numbers")
            std = std.reshape(K, 1) if std.ndim == 1 else std
            if std.ndim > 2 or (std.ndim == 2 and std.shape != (K, D) and std.shape != (K, 1)):
                raise ValueError(f"scales must be one number, K={K} numbers or a K x D = {K} x {D} list, got shape {list(std.shape)}")
            if not bool((std > 0).all()):
                raise ValueError("scales (component standard deviations) must be > 0")
            self.variances = (std * std).expand(K, D).clone()
            self.basis = None  # diagonal covariances: the eigenbasis is the identity
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (K,) or not bool((w > 0).all()):
            raise ValueError(f"weights must be K={K} positive numbers, got {w.tolist()}")
        self.log_weights = (w / w.sum()).log()

    # --- properties of the data ---------------------------------------------------
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def covariances(self) -> Tensor:
        """Sigma_k, [K, D, D]."""
        if self.basis is None:
            return torch.diag_embed(self.variances)
        return self.basis @ torch.diag_embed(self.variances) @ self.basis.transpose(1, 2)

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Covariance of the mixture: sum_k w_k (Sigma_k + mu_k mu_k^T) - mu mu^T."""
        w, mu = self.weights, self.means
        second = (w[:, None, None] * (self.covariances() + mu[:, :, None] * mu[:, None, :])).sum(0)
        m = self.mean()
        return second - m[:, None] * m[None, :]

    def sample(self, num: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Exact samples [num, *shape] (float64) and their component indices [num]."""
        k = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        z = torch.randn(num, self.dim, generator=generator, dtype=torch.float64) * self.variances[k].sqrt()
        if self.basis is not None:
            z = torch.einsum("nde,ne->nd", self.basis[k], z)
        return (self.means[k] + z).reshape(num, *self.shape), k

    # --- the noised marginal at (alpha, sigma) --------------------------------------
    def _per_component(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I) [B, K], and in the eigenbasis the
        offsets z = U^T (x - alpha mu_k) and variances [B, K, D]."""
        a, s = alpha[:, None, None], sigma[:, None, None]
        z = x[:, None, :] - a * self.means[None]
        if self.basis is not None:
            z = torch.einsum("bkd,kde->bke", z, self.basis)
        var = a * a * self.variances[None] + s * s
        logp = -0.5 * (z * z / var + torch.log(2 * math.pi * var)).sum(-1)
        return logp, z, var

    def _joint(self, logp: Tensor, labels: Tensor | None) -> Tensor:
        """log w_k + log p_k, with components other than a sample's label masked out. Label K (the
        `null class` of classifier-free guidance) means the whole mixture."""
        joint = self.log_weights[None] + logp
        if labels is None:
            return joint
        k = torch.arange(self.num_components, device=labels.device)
        keep = (labels[:, None] == k[None]) | (labels[:, None] == self.num_components)
        return joint.masked_fill(~keep.to(joint.device), -math.inf)

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0, labels: Tensor | None = None) -> Tensor:
        """log p(x_t) in nats [B] of samples x [B, *shape] (alpha=1, sigma=0: the data density)."""
        x, alpha, sigma = self._flat(x, alpha, sigma)
        return torch.logsumexp(self._joint(self._per_component(x, alpha, sigma)[0], labels), dim=1)

    def responsibilities(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0, labels: Tensor | None = None) -> Tensor:
        """p(k | x_t) [B, K]."""
        x, alpha, sigma = self._flat(x, alpha, sigma)
        return torch.softmax(self._joint(self._per_component(x, alpha, sigma)[0], labels), dim=1)

    def denoise(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(E[x0 | x_t], E[eps | x_t]) for x_t = alpha x0 + sigma eps; float64, shaped like x."""
        shape = x.shape
        x, alpha, sigma = self._flat(x, alpha, sigma)
        logp, z, var = self._per_component(x, alpha, sigma)
        r = torch.softmax(self._joint(logp, labels), dim=1)
        gain = alpha[:, None, None] * self.variances[None] / var * z  # E[x0 - mu_k | x_t, k] in the eigenbasis
        if self.basis is not None:
            gain = torch.einsum("kde,bke->bkd", self.basis, gain)
        x0 = (r[:, :, None] * (self.means[None] + gain)).sum(1)
        eps = (x - alpha[:, None] * x0) / sigma[:, None]
        return x0.reshape(shape), eps.reshape(shape)

    def _flat(self, x: Tensor, alpha, sigma) -> tuple[Tensor, Tensor, Tensor]:
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"samples have {x.shape[1]} elements, the mixture has D={self.dim}")
        full = lambda v: torch.as_tensor(v, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        if self.means.device != x.device:
            self.to(x.device)
        return x, full(alpha), full(sigma)

    def to(self, device) -> "GaussianMixture":
        for name in ("means", "variances", "log_weights", "basis"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    # --- construction from the config -----------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping) -> "GaussianMixture":
        """Build from conf/model/gmm.yaml's keys; `file` (YAML or JSON) replaces the keys it holds.
        Bad values raise ConfigError naming the key."""
        cfg = {k: v for k, v in dict(cfg).items() if k in CONFIG_KEYS}
        if cfg.get("file"):
            cfg.update(_read_mixture_file(cfg["file"]))
        means, covariances = cfg.get("means"), _plain(cfg.get("covariances"))
        if means is not None:
            means = torch.as_tensor(_plain(means), dtype=torch.float64)
        shape = cfg.get("shape")
        if shape is not None and (isinstance(shape, (str, int)) or not shape or not all(isinstance(s, int) and s > 0 for s in shape)):
            raise ConfigError(f"model.shape must be a list of positive integers ([D] or [C, H, W]) or null (inferred), got {shape!r}")
        shape = _inferred_shape(means, covariances) if shape is None else [int(s) for s in shape]
        if means is None:  # K random means ~ N(0, mean_scale^2 I), reproducible from `seed`
            K = cfg.get("num_components", 1)
            if not isinstance(K, int) or K < 1:
                raise ConfigError(f"model.num_components must be a positive integer, got {K!r}")
            g = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
            means = float(cfg.get("mean_scale", 1.0)) * torch.randn(K, math.prod(shape), generator=g, dtype=torch.float64)
        else:
            means = means.reshape(means.shape[0], -1) if means.ndim > 2 else means
        scales = None if covariances is not None else _plain(cfg.get("scales", 1.0))
        try:
            return cls(means, scales=scales, covariances=covariances, weights=_plain(cfg.get("weights")), shape=shape)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"model=gmm: {err}") from None


def _inferred_shape(means: Tensor | None, covariances) -> list[int] | None:
    """The shape of one sample when model.shape is null: that of one mean (K x C x H x W means give
    [C, H, W]; None lets the class take [D] of K x D means and report means of other ranks), else D
    of K x D x D covariances, else [2] for random means (the default before shape was inferred)."""
    if means is not None:
        return [int(s) for s in means.shape[1:]] if means.ndim > 2 else None
    try:
        cov = torch.as_tensor(covariances if covariances is not None else [])
    except (ValueError, TypeError, RuntimeError):  # ragged lists: the class reports them
        return [2]
    return [int(cov.shape[-1])] if cov.ndim == 3 else [2]  # other ranks: the class reports them


def _plain(value):
    """OmegaConf containers to plain lists."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def _read_mixture_file(path) -> dict:
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"model.file not found: {p} (a YAML or JSON file with means, scales or covariances, weights)")
    kind, what = identify(p)
    if kind != "text":
        raise ConfigError(f"model.file {p} is {what}, not a YAML or JSON mixture file (keys like means, scales, weights)")
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text())
        else:
            import yaml

            data = yaml.safe_load(p.read_text())
    except Exception as err:  # noqa: BLE001 -- any parse error is the user's file
        raise ConfigError(f"cannot parse model.file {p}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model.file {p} must hold a mapping (keys like means, scales, weights)")
    unknown = sorted(set(data) - set(CONFIG_KEYS) - {"file"})
    if unknown:
        raise ConfigError(f"model.file {p} has unknown keys {', '.join(unknown)}; allowed: {', '.join(CONFIG_KEYS[:-1])}")
    from diffctl.schema import check_node
    from diffctl.schema.keys import GMM

    for key, value in data.items():
        problem = _structure_problem(key, value)  # nested lists that make an array, before the value rules
        if problem is not None:
            raise ConfigError(f"model.file {p}: {key} must be {problem}, got {str(value)[:60]!r}")
        check_node(value, GMM[key], f"{key} in model.file {p}", "sample")  # the command line's rules: no NaN/inf
    return data


def _structure_problem(key: str, value) -> str | None:
    """What a mixture file's entry must be when it is not (None: it is), before any tensor is built."""
    if key in ("means", "scales", "covariances", "weights"):
        flat = np.ravel(np.array(value, dtype=object)) if isinstance(value, list) else [value]
        ok = value is None or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat)
        try:
            ok = ok and (value is None or np.array(value, dtype=np.float64).dtype == np.float64)
        except ValueError:  # ragged: rows of different lengths
            ok = False
        return None if ok else "a number or a rectangular (nested) list of numbers"
    if key in ("seed", "num_components") and (not isinstance(value, int) or isinstance(value, bool)):
        return "an integer"
    if key == "mean_scale" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return "a number"
    if key == "conditional" and not isinstance(value, bool):
        return "true or false"
    return None


class MixtureModel(nn.Module):
    """The exact model of a GaussianMixture under an SDE: the protocol of diffctl.denoiser's models
    (`model(x, t, cond) -> Prediction`, `capabilities`), with no network.

    conditional=True treats component indices as class labels (label K = the whole mixture, the
    null class that classifier-free guidance uses, exact for every label, hence always "trained").
    """

    def __init__(self, mixture: GaussianMixture, sde: SDE, conditional: bool = False):
        super().__init__()
        self.mixture, self.sde, self.conditional = mixture, sde, bool(conditional)
        self.conditioner = ClassConditioner(mixture.num_components) if self.conditional else Conditioner()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(conditions=self.conditioner.keys, num_classes=self.conditioner.num_classes, null_condition=True,
                            one_step=False, data_range=None, analytic=True, prediction="exact")  # fmt: skip

    @property
    def backbone(self):
        return None  # nothing to compile or convert to channels_last

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Prediction:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        alpha, sigma = self.sde.alpha(t), self.sde.sigma(t)
        x0, eps = self.mixture.denoise(x, alpha, sigma, class_labels(cond) if self.conditional else None)
        return Prediction(x0=x0.to(x.dtype), eps=eps.to(x.dtype), sigma=broadcast(sigma, x).to(x.dtype))

    def denoise(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Prediction:
        return self(x, t, cond)


def is_mixture(model_cfg) -> bool:
    """Whether a `model` config selects this analytic model (model=gmm)."""
    return model_cfg is not None and str(model_cfg.get("_target_", "")).startswith(__name__)
