"""Build SDE, objective, network and denoiser from a run config (live or stored in a checkpoint)."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffctl.checkpoint import checkpoint_config, denoiser_state, load_checkpoint
from diffctl.denoiser import Denoiser
from diffctl.errors import CheckpointError, ConfigError
from diffctl.objectives import Objective
from diffctl.sde import SDE


def instantiate_config(node, what: str, **kwargs):
    """hydra instantiate, turning constructor ValueErrors into one-line config errors."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"{what}: {cause}") from None
        raise


def build_sde(cfg: DictConfig) -> SDE:
    return instantiate_config(cfg.sde, "sde")


def build_objective(cfg: DictConfig, sde: SDE) -> Objective:
    return instantiate_config(cfg.objective, "objective", sde=sde)


def build_denoiser(cfg: DictConfig, sde: SDE, objective: Objective, shape: dict[str, int]) -> Denoiser:
    """shape: {'channels', 'resolution', 'num_classes'} of the data the network models."""
    net = instantiate_config(
        cfg.model,
        "model",
        in_channels=shape["channels"],
        resolution=shape["resolution"],
        num_classes=shape["num_classes"],
    )
    return Denoiser(
        net,
        sde,
        prediction=objective.prediction,
        sigma_data=cfg.denoiser.sigma_data,
        scale_input=cfg.denoiser.scale_input,
    )


def load_denoiser(path, use_ema: bool = True) -> tuple[Denoiser, DictConfig]:
    """Rebuild a trained denoiser from a checkpoint file or run directory."""
    ckpt = load_checkpoint(path)
    cfg = OmegaConf.create(checkpoint_config(ckpt, path))
    sde = build_sde(cfg)
    objective = build_objective(cfg, sde)
    denoiser = build_denoiser(cfg, sde, objective, cfg.data_shape)
    try:
        denoiser.load_state_dict(denoiser_state(ckpt, use_ema))
    except RuntimeError as err:
        raise CheckpointError(f"weights in {path} do not fit the network in its config: {str(err).splitlines()[0]}") from None
    return denoiser.eval(), cfg


def same_sde(a: SDE, b: SDE) -> bool:
    return type(a) is type(b) and vars(a) == vars(b)


def plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)
