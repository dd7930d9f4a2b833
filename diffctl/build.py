"""Build SDE, objective, network and denoiser from a run config (live or stored in a checkpoint)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffctl.checkpoint import checkpoint_config, denoiser_state, load_checkpoint, resolve_checkpoint
from diffctl.denoiser import DiffusionModel, compose
from diffctl.errors import CheckpointError, ConfigError
from diffctl.filekinds import describe, identify
from diffctl.objectives import Objective
from diffctl.prediction import model_prediction
from diffctl.sde import SDE


def _library_refusal(node, what: str, cause: BaseException) -> str:
    """One line for a library class (Lightning's Trainer, a logger) refusing its arguments, naming the
    key(s) of `node` its message is about: those it names, else those whose value it quotes."""
    from diffctl.schema import show

    text = " ".join(str(cause).split()) or type(cause).__name__
    items = [(k, v) for k, v in node.items() if k != "_target_"]
    named = [(k, v) for k, v in items if re.search(rf"\b{re.escape(str(k))}\b", text)]
    quoted = [(k, v) for k, v in items if isinstance(v, str) and len(v) > 1 and v.lower() in text.lower()]
    keys = named or quoted
    if not keys:
        return f"{what}: {node.get('_target_', what)} refused its arguments: {text}"
    given = ", ".join(f"{what}.{k}={show(v)}" for k, v in keys)
    return f"{given}: {'refused' if len(keys) == 1 else 'a combination refused'} by {node.get('_target_', what)}: {text}"


def instantiate_config(node, what: str, **kwargs):
    """hydra instantiate, turning constructor errors on the arguments into one-line config errors:
    diffctl's own classes name the key in their message; for a library's class (trainer, logger:
    Lightning's MisconfigurationException, ValueError, a missing optional package) the key is found."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        ours = str(node.get("_target_", "")).startswith("diffctl.")
        if isinstance(cause, (ValueError, TypeError)) and ours:
            raise ConfigError(f"{what}: {cause}") from None
        if isinstance(cause, (ValueError, TypeError, MisconfigurationException, ImportError)) and not ours:
            raise ConfigError(_library_refusal(node, what, cause)) from None
        raise


def build_sde(cfg: DictConfig) -> SDE:
    return instantiate_config(cfg.sde, "sde")


def build_objective(cfg: DictConfig, sde: SDE) -> Objective:
    return instantiate_config(cfg.objective, "objective", sde=sde)


def class_conditional(cfg: DictConfig) -> bool:
    """Class conditioning: conditional=true, or condition=class (the same thing in the condition group)."""
    return bool(cfg.get("conditional")) or _condition_name(cfg) == "class"


def _condition_name(cfg: DictConfig) -> str:
    node = cfg.get("condition")
    return str(node.get("name", "none")) if node else "none"


def build_conditioner(cfg: DictConfig, shape: dict[str, int]):
    """The image condition of a run config (condition=sr | colorize | inpaint), else None (class or no
    condition: compose's class conditioner)."""
    node = cfg.get("condition")
    if not node or not node.get("_target_"):
        return None
    if shape["num_classes"]:
        raise ConfigError(f"condition={_condition_name(cfg)} with class labels (conditional=true) is not supported: "
                          "train an image-to-image model without class labels")  # fmt: skip
    fields = {k: v for k, v in node.items() if k != "name"}
    return instantiate_config(OmegaConf.create(fields), "condition", channels=shape["channels"], resolution=shape["resolution"])


def build_denoiser(cfg: DictConfig, sde: SDE, objective: Objective, shape: dict[str, int]) -> DiffusionModel:
    """The composed model of a run config. shape: {'channels', 'resolution', 'num_classes'} of the data
    the network models (num_classes 0: unconditional). The parameterization is the config's
    (denoiser.prediction, else the older objective.prediction, else the objective's own:
    diffctl.prediction.model_prediction); label dropout (the null class) is the run's label_dropout; an
    image condition adds its channels to the network's input (its output keeps the data's channels)."""
    prediction = model_prediction(cfg, fallback=objective.prediction)  # fallback: an objective class not diffctl's
    conditioner = build_conditioner(cfg, shape)
    extra = {}
    if conditioner is not None:
        out = cfg.model.get("out_channels")
        if out is not None and int(out) != shape["channels"]:
            raise ConfigError(f"model.out_channels={out}: an image-to-image network outputs the data's {shape['channels']} channels; leave it null")
        extra = {"in_channels": shape["channels"] + conditioner.extra_channels, "out_channels": shape["channels"]}
    net = instantiate_config(
        cfg.model,
        "model",
        **{"in_channels": shape["channels"], **extra},
        resolution=shape["resolution"],
        num_classes=shape["num_classes"],
    )
    dropout = float(cfg.get("label_dropout", 0.0) or 0.0) if shape["num_classes"] else 0.0
    return compose(net, sde, prediction, sigma_data=cfg.denoiser.sigma_data, scale_input=cfg.denoiser.scale_input,
                   num_classes=shape["num_classes"], label_dropout=dropout, conditioner=conditioner,
                   data_range=None if cfg.get("first_stage") else (-1.0, 1.0))  # latents are unbounded: never clipped  # fmt: skip


# A stored config (checkpoint or export) is data from someone else's file: its `_target_`s are
# instantiated, so they may only name diffctl's own classes (env DIFFCTL_TRUSTED_TARGETS adds
# comma-separated prefixes for your own networks), else a config could call any function on load.
STORED_CONFIG_KEYS = ("model", "sde", "objective", "data", "condition")


def check_stored_targets(config: dict[str, Any], path) -> None:
    trusted = ("diffctl.", *(p.strip() for p in os.environ.get("DIFFCTL_TRUSTED_TARGETS", "").split(",") if p.strip()))

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_" and not (isinstance(value, str) and value.startswith(trusted)):
                    raise CheckpointError(
                        f"refusing the config stored in {path}: {where}._target_={value!r} is not a diffctl class and "
                        "would be called on load (set DIFFCTL_TRUSTED_TARGETS=<module prefix> if it is your own network)"
                    )
                walk(value, f"{where}.{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    for key in STORED_CONFIG_KEYS:
        walk(config.get(key), key)


def build_stored(config: dict[str, Any], state: dict[str, Any], path, what: str) -> tuple[DiffusionModel, DictConfig]:
    """DiffusionModel from a stored run config and its weights (strict: every tensor must fit);
    `what` names the weights in messages. Used by the loaders here and by `diffctl export`, which
    checks that what it writes will load."""
    if config.get("kind"):  # `diffctl train-classifier` writes kind=classifier (diffctl.classifier.load_classifier reads those)
        raise CheckpointError(f"{path} holds a {config['kind']}, not a diffusion model (a checkpoint of `diffctl train`)")
    check_stored_targets(config, path)
    cfg = OmegaConf.create(config)
    try:
        sde = build_sde(cfg)
        objective = build_objective(cfg, sde)
        denoiser = build_denoiser(cfg, sde, objective, cfg.data_shape)
    except ConfigError as err:
        raise CheckpointError(f"the config in {path} does not build a diffctl model ({err})") from None
    except Exception as err:  # noqa: BLE001  missing keys, hand-edited configs
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"the config in {path} does not build a diffctl model ({first})") from None
    mismatch = state_mismatch(denoiser.state_dict(), state)
    if mismatch is not None:
        raise CheckpointError(f"{what} in {path} do not fit the network in its config: {mismatch}; {REFIT_ADVICE}")
    try:
        denoiser.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{what} in {path} do not fit the network in its config: {str(err).splitlines()[0]}") from None
    return denoiser.eval(), cfg


REFIT_ADVICE = "use the file as diffctl wrote it, with the diffctl version that trained it"


def _shape(t) -> str:
    return str(list(t.shape))


def state_mismatch(expected: dict[str, Any], state: dict[str, Any], source: str = "the file", target: str = "the network") -> str | None:
    """How a state dict (from `source`) does not fit a network (`target`) whose own state dict is
    `expected`: tensors of another shape (the first named with both shapes), then missing and unexpected
    ones, each with a count (None: every tensor fits, as a strict load_state_dict needs)."""
    shaped = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]

    def more(keys: list[str], what: str) -> str:
        return f" (and {len(keys) - 1} more{what})" if len(keys) > 1 else ""

    problems = []
    if shaped:
        k = shaped[0]
        problems.append(f"{k} is {_shape(state[k])} in {source} but {_shape(expected[k])} in {target}{more(shaped, ' of another shape')}")
    if missing:
        problems.append(f"{missing[0]}{more(missing, '')} missing from {source}")
    if unexpected:
        problems.append(f"{unexpected[0]}{more(unexpected, '')} in {source} but not in {target}")
    return "; ".join(problems) or None


def load_denoiser(path, use_ema: bool = True, key: str = "ckpt") -> tuple[DiffusionModel, DictConfig]:
    """Rebuild a trained denoiser from a checkpoint file or run directory (`key`: the config key it
    was given as, for messages)."""
    ckpt = load_checkpoint(path, key)
    return build_stored(checkpoint_config(ckpt, path), denoiser_state(ckpt, use_ema), path, "weights")


# `diffctl export`: <name>.safetensors (the denoiser's tensors) next to <name>.json (EXPORT_FORMAT,
# which weights, where from, and the run config the network is built from).
EXPORT_FORMAT = "diffctl-export"
EXPORT_VERSION = 1
EXPORT_SUFFIXES = (".safetensors", ".json")


def export_files(path) -> tuple[Path, Path]:
    """(weights, config) of an export given as its .safetensors file, its .json file or its directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            what = "no .safetensors file" if not found else f"{len(found)} .safetensors files ({', '.join(f.name for f in found)})"
            raise CheckpointError(f"{p} holds {what}; give the export's .safetensors file")
        p = found[0]
    weights, config = p.with_suffix(".safetensors"), p.with_suffix(".json")
    if not weights.is_file():
        raise CheckpointError(f"export weights not found: {weights}")
    if not config.is_file():
        raise CheckpointError(f"export config not found: {config} (the .json written next to {weights.name} by `diffctl export`; "
                              f"{weights.name} without it is {describe(weights)}, not a diffctl export)")
    return weights, config


def is_export(path) -> bool:
    """True for an export file (.safetensors/.json) or a directory with a .safetensors file and no checkpoint."""
    p = Path(path).expanduser()
    if p.is_dir():
        has_ckpt = (p / "checkpoints" / "last.ckpt").is_file() or (p / "last.ckpt").is_file()
        return not has_ckpt and any(p.glob("*.safetensors"))
    return p.suffix in EXPORT_SUFFIXES


def resolve_weights(path) -> Path:
    """A checkpoint (file or run dir) or an export (its .safetensors file), checked to exist."""
    return export_files(path)[0] if is_export(path) else resolve_checkpoint(path)


def read_export(path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(export metadata with its 'config', tensors) of an export, read without unpickling anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, config_path = export_files(path)
    kind, what = identify(weights)
    if kind != "safetensors":
        raise CheckpointError(f"cannot read {weights}: the file is truncated or not a safetensors file (it is {what})")
    if identify(config_path)[0] != "text":
        raise CheckpointError(f"cannot read export config {config_path}: it is {describe(config_path)}, not JSON")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read export config {config_path}: {str(err).splitlines()[0]}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{config_path} is not a diffctl export config (expected format={EXPORT_FORMAT!r} and a 'config')")
    if meta.get("version") != EXPORT_VERSION:
        raise CheckpointError(f"{config_path} is export version {meta.get('version')!r}; this diffctl reads version {EXPORT_VERSION}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {weights}: the file is truncated or not a safetensors file ({str(err).splitlines()[0]})") from None
    return meta, state


def load_export(path) -> tuple[DiffusionModel, DictConfig, str]:
    """Rebuild a denoiser from `diffctl export` output: (denoiser, run config, 'ema' | 'raw')."""
    meta, state = read_export(path)
    weights, _ = export_files(path)
    denoiser, cfg = build_stored(meta["config"], state, weights, "weights")
    return denoiser, cfg, str(meta.get("weights", "unknown"))


def same_sde(a: SDE, b: SDE) -> bool:
    return type(a) is type(b) and vars(a) == vars(b)


def plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)
