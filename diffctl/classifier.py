"""A noise-conditional classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021):
the network with the SDE and the denoiser's input conventions, its training loss, and the loader
that sampling uses (`load_classifier(path).log_probs(x, t)`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from diffctl.build import build_sde, check_stored_targets, instantiate_config, state_mismatch, REFIT_ADVICE
from diffctl.checkpoint import checkpoint_config, denoiser_state, load_checkpoint
from diffctl.conditioning import CLASS_LABEL, IMAGE, ClassConditioner
from diffctl.errors import CheckpointError, ConfigError
from diffctl.objectives import Objective, sample_times
from diffctl.rng import BatchRandom
from diffctl.parameterization import NetworkInputs
from diffctl.sde import SDE, broadcast

KIND = "classifier"  # the run config's `kind` in a `diffctl train-classifier` checkpoint


def images_and_labels(batch) -> tuple[Tensor, Tensor]:
    """(x in [-1, 1], integer class labels) of a data batch (dict: diffctl.conditioning's keys)."""
    return batch[IMAGE], batch[CLASS_LABEL]


def _at_least_float32(logits: Tensor) -> Tensor:
    """Half-precision logits (autocast) in float32 for the softmax; float64 stays float64."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class NoisyClassifier(nn.Module):
    """Logits of p(y | x_t, t) for x_t = alpha(t) x0 + sigma(t) eps of this SDE.

    The network sees what a diffusion model's backbone sees (diffctl.parameterization's c_in and
    c_noise): x_t divided by its marginal std sqrt(alpha^2 sigma_data^2 + sigma^2) when
    `scale_input`, and the noise label 1000 t; so a classifier and a denoiser trained on one SDE
    read x_t alike. Its `conditioner` reads the labels of a batch (never dropped): they are the
    targets, which the training module hands to the loss as a diffusion model's condition."""

    summary_name = "classifier"  # its row in the parameter table

    def __init__(self, net: nn.Module, sde: SDE, sigma_data: float = 0.5, scale_input: bool = True,
                 data_shape: dict[str, int] | None = None):  # fmt: skip
        super().__init__()
        self.net, self.sde = net, sde
        self.inputs = NetworkInputs(sde, sigma_data, scale_input)  # c_in, c_noise only: no prediction
        self.conditioner = ClassConditioner(int(net.num_classes), dropout=0.0)
        self.data_shape = dict(data_shape or {})  # {channels, resolution, num_classes} it was trained on

    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = (t.to(x.dtype) if t.is_floating_point() else t.float()).reshape(-1).expand(x.shape[0])
        shape = self.data_shape
        if shape and tuple(x.shape[1:]) != (shape["channels"], shape["resolution"], shape["resolution"]):
            raise ValueError(f"x has shape {list(x.shape)}; this classifier takes "
                             f"[B, {shape['channels']}, {shape['resolution']}, {shape['resolution']}]")  # fmt: skip
        alpha, sigma = broadcast(self.sde.alpha(t), x), broadcast(self.sde.sigma(t), x)
        return self.net(self.inputs.network_input(x, alpha, sigma), self.inputs.c_noise(t))

    def log_probs(self, x: Tensor, t: Tensor) -> Tensor:
        """log p(y | x_t, t) for every class, [B, num_classes]; differentiable in x (guidance takes
        its gradient). t: a number or [B] diffusion times."""
        return F.log_softmax(_at_least_float32(self(x, t)), dim=-1)


class ClassifierObjective(Objective):
    """Cross-entropy of the label at x_t = alpha x0 + sigma eps, t ~ U[eps, 1] stratified over the
    global batch (diffctl.objectives.sample_times: keyed by (seed, step), so resume is exact)."""

    prediction = "logits"

    def loss(self, classifier: NoisyClassifier, x0: Tensor, cond: dict[str, Tensor], rng: BatchRandom, **_) -> Tensor:
        t = sample_times(self.sde, rng, x0.shape[0]).to(x0.dtype)
        noise = rng.randn(x0.shape, x0.dtype)
        return F.cross_entropy(_at_least_float32(classifier(self.sde.marginal(x0, t, noise), t)), cond[CLASS_LABEL])


def build_classifier(cfg: DictConfig, sde: SDE, shape: dict[str, int]) -> NoisyClassifier:
    """The classifier of a train-classifier run config for data of `shape` {channels, resolution, num_classes}."""
    net = instantiate_config(cfg.model, "model", in_channels=shape["channels"], resolution=shape["resolution"],
                             num_classes=shape["num_classes"])  # fmt: skip
    return NoisyClassifier(net, sde, cfg.denoiser.sigma_data, cfg.denoiser.scale_input, data_shape=shape)


def load_classifier(path, key: str = "classifier") -> NoisyClassifier:
    """The EMA classifier of a `diffctl train-classifier` checkpoint (file or run directory), in eval
    mode with frozen weights: gradients of `log_probs(x, t)` flow to x only. Anything else (a
    diffusion checkpoint, an unsafe or damaged file) is refused with a one-line CheckpointError."""
    ckpt = load_checkpoint(path, key)
    config: dict[str, Any] = checkpoint_config(ckpt, path)
    if config.get("kind") != KIND:
        raise CheckpointError(f"{key}={path} is a {config.get('kind') or 'diffusion model'} checkpoint, not a classifier "
                              "(train one with `diffctl train-classifier`)")  # fmt: skip
    check_stored_targets(config, path)  # its config is instantiated: only diffctl classes
    cfg = OmegaConf.create(config)
    try:
        classifier = build_classifier(cfg, build_sde(cfg), dict(cfg.data_shape))
    except (ConfigError, ValueError, TypeError, KeyError, AttributeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"the config in {path} does not build a diffctl classifier ({first})") from None
    state = denoiser_state(ckpt, use_ema=True)
    mismatch = state_mismatch(classifier.state_dict(), state)
    if mismatch is not None:
        raise CheckpointError(f"weights in {path} do not fit the classifier in its config: {mismatch}; {REFIT_ADVICE}")
    classifier.load_state_dict(state)
    return classifier.eval().requires_grad_(False)
