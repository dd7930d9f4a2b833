"""First-stage autoencoders on disk: a diffusers `AutoencoderKL` folder (config.json +
diffusion_pytorch_model.safetensors, e.g. Stable Diffusion's `vae/`) read into diffctl's own network
(diffctl/networks/autoencoder.py), without diffusers at run time; and diffctl's autoencoders saved in
the same format, so diffusers (or diffctl) loads them back.

Only safetensors weights are read (a diffusers `.bin` would need unpickling). Every way a folder can
be wrong is a one-line error naming the folder and the first thing wrong, before any tensor is used:
no folder, a pipeline folder instead of its vae/, no or unreadable config.json, another model class,
a block type, activation or key diffctl's network does not implement, missing/unexpected/mis-shaped
tensors (how many, one example).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffctl.build import state_mismatch
from diffctl.errors import CheckpointError, ConfigError
from diffctl.filekinds import describe, identify
from diffctl.files import create_new, json_text
from diffctl.networks.autoencoder import AutoencoderKL

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "AutoencoderKL"
DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"  # LDM's blocks; others are other architectures
ACTIVATIONS = ("silu", "swish")  # diffusers maps both names to nn.SiLU
# keys that change nothing in the network: diffusers' bookkeeping, its tiling size, its fp16 upcast hint
# (diffctl runs the autoencoder in float32), per-channel latent statistics some pipelines normalize by
# (diffctl estimates the latent scale from the data instead)
IGNORED = ("_diffusers_version", "_name_or_path", "_use_default_values", "sample_size", "force_upcast", "latents_mean", "latents_std")
ARGUMENTS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
             "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv", "scaling_factor", "shift_factor")  # fmt: skip
# diffusers folders saved before diffusers 0.14 name the mid-block attention's projections the old way
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def autoencoder_from_config(config: Any, where: str = "config") -> AutoencoderKL:
    """The network a diffusers AutoencoderKL config (a dict as in config.json) describes; missing keys take
    diffusers' defaults. ConfigError `{where}: ...` for another class or anything diffctl does not implement."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: not a JSON object of config keys (it is a {type(config).__name__})")
    name = config.get("_class_name")
    if name != CLASS_NAME:
        raise ConfigError(f"{where}: _class_name={name!r}, not a diffusers {CLASS_NAME} (diffctl reads KL autoencoders only)")
    unknown = sorted(set(config) - set(ARGUMENTS) - set(IGNORED) - {"_class_name", "act_fn", "down_block_types", "up_block_types"})
    if unknown:
        raise ConfigError(f"{where}: unsupported key {unknown[0]}={config[unknown[0]]!r}"
                          f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; diffctl's AutoencoderKL does not implement it")  # fmt: skip
    act = config.get("act_fn", "silu")
    if act not in ACTIVATIONS:
        raise ConfigError(f"{where}: act_fn={act!r} is not supported (diffctl's AutoencoderKL uses silu)")
    args = {k: config[k] for k in ARGUMENTS if k in config}
    try:
        model = AutoencoderKL(**args)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    levels = len(model.config["block_out_channels"])
    for key, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
        types = config.get(key, [block])
        if not isinstance(types, (list, tuple)) or len(types) != levels:
            raise ConfigError(f"{where}: {key}={types!r} needs one entry per block_out_channels level ({levels})")
        other = [t for t in types if t != block]
        if other:
            raise ConfigError(f"{where}: {key} has {other[0]!r}; diffctl's AutoencoderKL implements only {block}")
    return model


def diffusers_config(model: AutoencoderKL) -> dict[str, Any]:
    """The config.json diffusers builds the same network from."""
    levels = len(model.config["block_out_channels"])
    return {"_class_name": CLASS_NAME, **model.config, "act_fn": "silu",
            "down_block_types": [DOWN_BLOCK] * levels, "up_block_types": [UP_BLOCK] * levels}  # fmt: skip


def _files(folder: Path, where: str) -> tuple[Path, Path]:
    if not folder.exists():
        raise ConfigError(f"{where}: no such folder (give a diffusers AutoencoderKL folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not folder.is_dir():
        raise ConfigError(f"{where}: is {describe(folder)}, not a folder (give the folder holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config.is_file():
        hint = f"; it is a pipeline folder: give {folder / 'vae'}" if (folder / "vae" / CONFIG_NAME).is_file() else ""
        raise ConfigError(f"{where}: no {CONFIG_NAME} in the folder{hint}")
    if not weights.is_file():
        present = sorted(p.name for p in folder.iterdir() if p.name.startswith("diffusion_pytorch_model"))
        found = f" (it has {', '.join(present)}; only {WEIGHTS_NAME} is read: .bin files need unpickling)" if present else ""
        raise ConfigError(f"{where}: no {WEIGHTS_NAME} in the folder{found}")
    return config, weights


def read_config(path: Path, where: str) -> Any:
    if identify(path)[0] != "text":
        raise ConfigError(f"{where}: {path.name} is {describe(path)}, not JSON")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{where}: cannot read {path.name}: {str(err).splitlines()[0]}") from None


def read_weights(path: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    kind, what = identify(path)
    if kind != "safetensors":
        raise CheckpointError(f"{where}: {path.name} is {what}, not a safetensors file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot read {path.name} ({str(err).splitlines()[0]})") from None


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        head, _, tail = key.rpartition(".")  # ... .attentions.0.query . weight
        prefix, _, name = head.rpartition(".")
        if ".attentions." in key and name in OLD_ATTENTION_NAMES:
            key = f"{prefix}.{OLD_ATTENTION_NAMES[name]}.{tail}"
        out[key] = value
    return out


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """CheckpointError unless `state` has exactly the model's keys with its shapes."""
    mismatch = state_mismatch(model.state_dict(), state, "the file", f"its {CONFIG_NAME}")
    if mismatch is not None:
        raise CheckpointError(f"{where}: {WEIGHTS_NAME} does not fit its {CONFIG_NAME}: {mismatch}")


def load_diffusers_vae(folder: str | Path, key: str = "first_stage") -> AutoencoderKL:
    """diffctl's AutoencoderKL with the weights of a diffusers AutoencoderKL folder (or one `save_autoencoder`
    wrote), in float32 and eval mode; errors read `{key}={folder}: ...`."""
    folder = Path(folder).expanduser()
    where = f"{key}={folder}"
    config_path, weights_path = _files(folder, where)
    model = autoencoder_from_config(read_config(config_path, where), f"{where}: {CONFIG_NAME}")
    state = _renamed(read_weights(weights_path, where))
    check_state(model, state, where)
    model.load_state_dict(state, strict=True)  # copies (and casts fp16/bf16 files) into float32 parameters
    return model.eval()


def save_autoencoder(model: AutoencoderKL, folder: str | Path) -> None:
    """Write `model` as a diffusers AutoencoderKL folder. Nothing is overwritten: both files must be new.
    config.json is written last, so a folder holding it is complete."""
    from safetensors.torch import save

    folder = Path(folder).expanduser()
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (weights_path, config_path):
        if p.exists():
            raise ConfigError(f"{p} already exists; choose another folder (nothing is overwritten)")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    taken = "appeared while saving (another process wrote it); choose another folder (nothing is overwritten)"
    create_new(weights_path, save(state), taken)
    create_new(config_path, json_text(diffusers_config(model)), taken)


EXPORT_DIR = "autoencoder"  # the diffusers folder a `diffctl train-autoencoder` run writes its EMA weights to


def load_first_stage(path: str | Path, key: str = "first_stage") -> AutoencoderKL:
    """The autoencoder `key`=path names: a diffusers AutoencoderKL folder, a `diffctl train-autoencoder` run
    directory (its autoencoder/ export, else the EMA weights of its last checkpoint) or one of its .ckpt
    files. A diffusion model's or a classifier's checkpoint is refused in one line, naming what it is."""
    p = Path(path).expanduser()
    if p.is_dir() and not (p / CONFIG_NAME).exists():
        if (p / EXPORT_DIR / CONFIG_NAME).is_file():
            return load_diffusers_vae(p / EXPORT_DIR, key)
        if (p / "checkpoints").is_dir() or (p / "last.ckpt").is_file():  # a run that ended before its export
            return _from_checkpoint(p, key)
    if p.is_file() and identify(p)[0] != "safetensors":
        return _from_checkpoint(p, key)
    return load_diffusers_vae(p, key)


def _from_checkpoint(path: Path, key: str) -> AutoencoderKL:
    from diffctl.autoencoder_training import KIND, autoencoder_from_checkpoint
    from diffctl.checkpoint import checkpoint_config, load_checkpoint

    ckpt = load_checkpoint(path, key)  # weights_only: nothing in the file is unpickled beyond tensors and plain data
    config = checkpoint_config(ckpt, path)
    if config.get("kind") != KIND:
        raise ConfigError(f"{key}={path} holds a {config.get('kind') or 'diffusion model'} checkpoint, not an autoencoder "
                          "(give a `diffctl train-autoencoder` run or a diffusers AutoencoderKL folder)")  # fmt: skip
    return autoencoder_from_checkpoint(ckpt, config, path, key)
