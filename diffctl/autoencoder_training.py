"""Training a first-stage autoencoder with diffctl's training module: the autoencoder, its loss's learned
log-variance and its patch discriminator are one trained module (`AutoencoderTrainee`), so EMA, warmup,
the nan policy, keyed randomness, exact resume and DDP are those of `diffctl train`
(diffctl.module.DiffusionModule).

How it differs from LDM's two-optimizer loop (taming-transformers' VQGAN training, which LDM follows):
- one optimizer over both networks and one backward per step. The generator's adversarial term reads
  the discriminator through detached parameters (so it trains the autoencoder only) and the
  discriminator's loss reads detached reconstructions (so it trains the discriminator only); with
  Adam's per-parameter state this is LDM's update, except that LDM recomputes the reconstructions
  after the autoencoder's step before the discriminator's, and here both see the same ones. One
  optimizer step per batch also keeps Lightning's global_step (max_steps, checkpoints) counting batches.
- the posterior draw z ~ q(z | x) uses diffctl's keyed noise, so a resumed or DDP run draws what an
  uninterrupted single-process run draws.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torch import Tensor, nn

from diffctl.autoencoder_loss import AutoencoderLoss, NLayerDiscriminator
from diffctl.build import instantiate_config
from diffctl.conditioning import Conditioner
from diffctl.errors import CheckpointError, ConfigError
from diffctl.module import DiffusionModule, ParameterAverage
from diffctl.networks.autoencoder import AutoencoderKL
from diffctl.objectives import Objective

KIND = "autoencoder"  # the run config's `kind` in a `diffctl train-autoencoder` checkpoint
TARGET = "diffctl.networks.autoencoder.AutoencoderKL"
FROZEN = ".lpips."  # state-dict keys of the perceptual network: given by path, never saved in checkpoints


class AutoencoderTrainee(nn.Module):
    """What one optimizer trains: the autoencoder and its loss (the learned log-variance, the optional
    discriminator; the LPIPS network inside the loss is frozen). `conditioner`: none, as the training
    module expects of the network it trains."""

    summary_name = "autoencoder"  # its row in the parameter table

    def __init__(self, autoencoder: AutoencoderKL, loss: AutoencoderLoss):
        super().__init__()
        self.autoencoder, self.loss = autoencoder, loss
        self.conditioner = Conditioner()


class AutoencoderObjective(Objective):
    """The KL autoencoder's loss (diffctl/autoencoder_loss.py) of one batch, generator and discriminator
    terms summed; `last_logs`: the terms of the last call, detached, for the training module to log."""

    prediction = "reconstruction"

    def __init__(self):
        super().__init__(sde=None)
        self.last_logs: dict[str, Tensor] = {}

    def loss(self, trainee: AutoencoderTrainee, x0: Tensor, cond, rng, step: int = 0, **_) -> Tensor:
        ae, loss = trainee.autoencoder, trainee.loss
        posterior = ae.encode(x0)
        recon = ae.decode(posterior.sample(noise=rng.randn(posterior.shape, posterior.mean.dtype)))
        total, logs = loss.generator_loss(x0, recon, posterior, step, last_layer=ae.last_layer)  # trains no discriminator
        d_loss, d_logs = loss.discriminator_loss(x0, recon, step)
        self.last_logs = logs | d_logs
        return total + d_loss if loss.adversarial(step) else total


class AutoencoderModule(DiffusionModule):
    """DiffusionModule training an AutoencoderTrainee: its EMA copy averages the autoencoder alone (the
    exported weights); the loss terms are logged beside train/loss; the LPIPS weights stay out of
    checkpoints (they are read from their file, and would double every checkpoint's size)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self._loss_is_read_at(self.global_step):
            self.log_dict({f"train/{k}": v.float() for k, v in self.objective.last_logs.items() if k != "loss"}, on_step=True, on_epoch=False)
        return loss

    def on_train_start(self) -> None:
        self._ema_average = ParameterAverage(self.ema.autoencoder, self.denoiser.autoencoder)
        self._target_average = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if FROZEN in k]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if state is not None:  # the frozen network this run was given, in place of the keys saving dropped
            state.update({k: v for k, v in self.state_dict().items() if FROZEN in k})


def build_autoencoder(cfg: DictConfig, channels: int) -> AutoencoderKL:
    """The autoencoder of a train-autoencoder config for images of `channels` channels."""
    try:
        return instantiate_config(cfg.model, "model", in_channels=channels, out_channels=channels)
    except ConfigError as err:
        raise ConfigError(f"model: {err}") from None


def build_trainee(cfg: DictConfig, shape: dict[str, int]) -> AutoencoderTrainee:
    """Autoencoder and loss of a train-autoencoder config for data of `shape` {channels, resolution}."""
    autoencoder = build_autoencoder(cfg, shape["channels"])
    try:
        autoencoder.latent_shape(shape["channels"], shape["resolution"], shape["resolution"])
    except ConfigError as err:
        raise ConfigError(f"model.block_out_channels does not fit data={cfg.data.name}: {err}") from None
    lc = cfg.loss
    lpips = None
    if lc.lpips:
        from diffctl.lpips import LPIPS

        lpips = LPIPS(lc.lpips, resize=lc.lpips_resize, key="loss.lpips")
        lpips.check_size(shape["resolution"], shape["resolution"])
    disc = None
    if lc.discriminator.enabled:
        layers = int(lc.discriminator.n_layers)
        if shape["resolution"] < 2 ** (layers + 2):  # each stride-2 level halves; the last convolutions need 4x4
            raise ConfigError(f"loss.discriminator.n_layers={layers} needs images of at least {2 ** (layers + 2)}x{2 ** (layers + 2)} "
                              f"pixels; data={cfg.data.name} has {shape['resolution']}x{shape['resolution']}: lower n_layers")  # fmt: skip
        disc = NLayerDiscriminator(shape["channels"], int(lc.discriminator.channels), layers)
    loss = AutoencoderLoss(
        kl_weight=lc.kl_weight, reconstruction=lc.reconstruction, lpips=lpips, perceptual_weight=lc.perceptual_weight,
        logvar_init=lc.logvar_init, discriminator=disc, disc_start=lc.discriminator.start, disc_weight=lc.discriminator.weight,
        disc_factor=lc.discriminator.factor, disc_loss=lc.discriminator.loss,
    )  # fmt: skip
    return AutoencoderTrainee(autoencoder, loss)


def autoencoder_from_checkpoint(ckpt: dict[str, Any], config: dict[str, Any], path, key: str = "first_stage") -> AutoencoderKL:
    """The EMA autoencoder of a loaded `diffctl train-autoencoder` checkpoint, in eval mode."""
    from diffctl.first_stage import check_state

    model_cfg = dict(config.get("model") or {})
    if model_cfg.get("_target_") != TARGET:
        raise CheckpointError(f"{key}={path}: its model._target_ is {model_cfg.get('_target_')!r}, not {TARGET}")
    channels = int((config.get("data_shape") or {}).get("channels", 0))
    args = {k: v for k, v in model_cfg.items() if k != "_target_"}
    try:
        autoencoder = AutoencoderKL(in_channels=channels, out_channels=channels, **args)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{key}={path}: its config does not build an autoencoder ({str(err).splitlines()[0]})") from None
    prefix = "ema.autoencoder."
    state = {k[len(prefix) :]: v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith(prefix)}
    check_state(autoencoder, state, f"{key}={path}")
    autoencoder.load_state_dict(state)
    return autoencoder.eval()
