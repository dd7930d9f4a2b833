"""`diffctl export`: a checkpoint's EMA (default) or raw denoiser weights as a .safetensors file, with
the run config the network is built from as JSON next to it. `diffctl sample ckpt=<export>` samples
from it; loading reads tensors and JSON only (no pickle), see diffctl.build.load_export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffctl.build import EXPORT_FORMAT, EXPORT_VERSION, build_stored, is_export
from diffctl.checkpoint import checkpoint_config, denoiser_state, file_sha256, load_checkpoint, resolve_checkpoint
from diffctl.errors import ConfigError
from diffctl.files import create_new, json_text
from diffctl.rundir import claims_run_dir
from diffctl.signals import interruptible



def _targets(cfg: DictConfig) -> tuple[Path, Path]:
    """(weights, config) paths: out= as a .safetensors file, or a directory for model.safetensors; default the run dir."""
    out = cfg.out
    if out is None:
        base = Path(HydraConfig.get().runtime.output_dir) / "model"
    else:
        out = Path(str(out)).expanduser()
        if out.suffix == ".json":
            raise ConfigError(f"out={out} names the config; give the .safetensors path or a directory (the .json goes next to it)")
        if out.suffix != ".safetensors" and out.exists() and not out.is_dir():
            raise ConfigError(f"out={out} is an existing file, not a directory; give a new <name>.safetensors path or a directory (nothing is overwritten)")
        base = out.with_suffix("") if out.suffix == ".safetensors" else out / "model"
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def _write_new(path: Path, data: bytes) -> None:
    create_new(path, data, "appeared while exporting (another process wrote it); choose another out= (nothing is overwritten)")


def _kept(cfg: DictConfig) -> str:
    return "nothing was exported (an interrupted export leaves no file); run the command again"


@interruptible(_kept)  # SIGTERM/SIGINT: one line, exit 1
@claims_run_dir("export")  # refuses a used run directory, locks it while writing
def export(cfg: DictConfig) -> dict[str, Any]:
    from safetensors.torch import save

    from diffctl.schema import validate

    validate(cfg, "export")  # every key's type and range (diffctl/schema/keys.py), before any work
    if not cfg.ckpt:
        raise ConfigError("export needs ckpt=<checkpoint file or run directory>")
    if is_export(cfg.ckpt):
        raise ConfigError(f"{cfg.ckpt} is already an export; give the training checkpoint (.ckpt or run directory)")
    weights_path, config_path = _targets(cfg)
    for p in (weights_path, config_path):  # never overwrite an export, checked before any work
        if p.exists():
            raise ConfigError(f"{p} already exists; choose another out= (nothing is overwritten)")
    ckpt_path = resolve_checkpoint(cfg.ckpt).resolve()
    ckpt = load_checkpoint(ckpt_path)
    config = checkpoint_config(ckpt, ckpt_path)
    if config.get("first_stage"):  # an export holds the denoiser alone: without its decoder the samples are latents
        raise ConfigError(f"{ckpt_path} is a latent diffusion model: an export would leave out its first stage; "
                          "sample from the checkpoint itself (it holds both)")  # fmt: skip
    state = denoiser_state(ckpt, cfg.use_ema)
    build_stored(config, state, ckpt_path, "weights")  # the export must load: config and weights fit
    state = {k: v.detach().contiguous() for k, v in state.items()}
    kind = "ema" if cfg.use_ema else "raw"
    meta = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "weights": kind,
        "source": str(ckpt_path),
        "global_step": ckpt.get("global_step"),
        "config": config,
    }
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    # config first: an export whose .safetensors exists is complete
    _write_new(config_path, json_text(meta))
    try:
        _write_new(weights_path, save(state, metadata={"format": EXPORT_FORMAT, "weights": kind}))
    except BaseException:  # failed or interrupted: no config without its weights (it would block the next try)
        config_path.unlink(missing_ok=True)
        raise
    digest = file_sha256(weights_path)
    result = {
        "weights_file": str(weights_path),
        "config_file": str(config_path),
        "weights": kind,
        "tensors": len(state),
        "parameters": int(sum(v.numel() for v in state.values())),
        "bytes": weights_path.stat().st_size,
        "sha256": digest,
        "source": str(ckpt_path),
    }
    print(f"exported {kind} weights of {ckpt_path} ({result['parameters']} parameters) to {weights_path} (+ {config_path.name})")
    print(f"sample from it: diffctl sample ckpt={weights_path}")
    return result
