"""What a command samples from: a trained checkpoint (or its export), or the analytic mixture
(model=gmm), with what the commands need to know about it (shape of one sample, training data,
which weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from diffctl.build import build_sde, build_stored, is_export, load_export
from diffctl.checkpoint import checkpoint_config, denoiser_state, load_checkpoint
from diffctl.errors import CheckpointError, ConfigError
from diffctl.latent_codec import codec_from_checkpoint
from diffctl.networks.gmm import GaussianMixture, MixtureModel
from diffctl.sde import VPSDE


@dataclass
class Source:
    """What is sampled: a trained checkpoint or the analytic mixture (model=gmm). What it can do is
    `denoiser.capabilities` (diffctl.denoiser.Capabilities)."""

    denoiser: Any  # the composed model (diffctl.denoiser protocol)
    shape: tuple[int, ...]  # one sample
    data: DictConfig | None = None  # training data config: the metrics' reference
    mixture: GaussianMixture | None = None
    description: str = ""
    weights: str = "exact"  # ema | raw | exact (model=gmm)
    classifier: Any = None  # classifier guidance's p(y | x_t) (diffctl.guidance.NoiseClassifier), if any
    codec: Any = None  # latent diffusion: the first stage that decodes samples (diffctl.latent_codec.LatentCodec)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One output's shape: `shape` itself, or for a latent model the decoded image's."""
        return tuple(self.shape) if self.codec is None else self.codec.image_shape(self.shape)


def load_source(cfg: DictConfig, ckpt: str | None) -> Source:
    """The model of `ckpt` (a training checkpoint or an export; cfg.use_ema picks the weights), or
    with ckpt None the analytic mixture cfg.model under cfg.sde (VP when none is given); with
    cfg.classifier, the classifier that guides it."""
    source = _load_model(cfg, ckpt)
    if cfg.get("classifier"):
        source.classifier = load_guide(str(cfg.classifier), source)
    return source


def load_guide(spec: str, source: Source):
    """The classifier of `classifier=`: `exact` (model=gmm: the mixture's exact posterior under its
    SDE) or a `diffctl train-classifier` checkpoint, which must have been trained on samples of the
    model's shape (its SDE and class count are checked where it is attached: diffctl.guidance)."""
    if spec == "exact":
        if source.mixture is None:
            raise ConfigError("classifier=exact is the exact posterior of model=gmm; for a checkpoint give a "
                              "`diffctl train-classifier` checkpoint or run directory")  # fmt: skip
        from diffctl.guidance import ExactMixtureClassifier

        return ExactMixtureClassifier(source.mixture, source.denoiser.sde)
    if source.codec is not None:
        raise ConfigError(f"classifier guidance of a latent diffusion model needs a classifier of its latents; diffctl's classifiers "
                          f"see pixels: sample without classifier={spec} (classifier-free guidance works: guidance=)")  # fmt: skip
    if source.mixture is not None:
        raise ConfigError(f"model=gmm is guided by its exact classifier: use classifier=exact, not classifier={spec}")
    from diffctl.classifier import load_classifier

    classifier = load_classifier(spec)
    shape = classifier.data_shape
    mine = (shape.get("channels"), shape.get("resolution"), shape.get("resolution"))
    if mine != tuple(source.shape):
        raise ConfigError(f"the classifier {spec} was trained on {mine[0]}x{mine[1]}x{mine[2]} images, "
                          f"the model makes {'x'.join(map(str, source.shape))}; train one on the model's data")  # fmt: skip
    return classifier


def _load_model(cfg: DictConfig, ckpt: str | None) -> Source:
    if ckpt is None:
        mixture = GaussianMixture.from_config(cfg.model)
        sde = build_sde(cfg) if cfg.get("sde") is not None else VPSDE()
        denoiser = MixtureModel(mixture, sde, conditional=cfg.model.get("conditional", False))
        return Source(denoiser, mixture.shape, mixture=mixture, description="model=gmm")
    if is_export(ckpt):  # `diffctl export` output: the weights it holds (EMA unless exported with use_ema=false)
        denoiser, train_cfg, weights = load_export(ckpt)
        codec = None  # `diffctl export` refuses latent models, whose first stage an export would not hold
        if cfg.get("use_ema") is False and weights == "ema":
            raise ConfigError(f"{ckpt} holds EMA weights only; for the raw weights export with `diffctl export use_ema=false`")
    else:
        stored = load_checkpoint(ckpt, "ckpt")
        config = checkpoint_config(stored, ckpt)
        denoiser, train_cfg = build_stored(config, denoiser_state(stored, cfg.use_ema), ckpt, "weights")
        weights = "ema" if cfg.use_ema else "raw"
        codec = codec_from_checkpoint(stored, config, ckpt)
    shape = train_cfg.data_shape
    return Source(
        denoiser,
        (shape.channels, shape.resolution, shape.resolution),
        data=train_cfg.data,
        description=ckpt,
        weights=weights,
        codec=codec,
    )


def newest_checkpoint(root: Path = Path("outputs")) -> Path:
    candidates = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no checkpoint found under {root.resolve()}; train one with `diffctl train` or pass ckpt=")
    return candidates[-1]
