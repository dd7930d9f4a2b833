"""Continuing an interrupted index job (diffctl.indexjob) with `resume=<run dir>`: the run's own
config with only harmless overrides, the manifest that pins its checkpoint (sha256) and noise
version, and the line that tells how to continue. The finished shards themselves are checked by
diffctl.resume_check."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffctl.checkpoint import file_sha256
from diffctl.errors import CheckpointError, ConfigError
from diffctl.files import atomic_write_json
from diffctl.indexjob import PARTIAL, finished_count
from diffctl.noise import NOISE_VERSIONS
from diffctl.resume_check import read_manifest, read_run_config

MANIFEST = "manifest.json"  # in PARTIAL: the resolved checkpoint, its sha256 and the noise version
# Keys that may differ when resuming: they do not change the samples.
RESUME_FREE = ("resume", "progress_bar", "metrics")
# These change which samples share a batch: free unless the job adapts to the whole batch.
RESUME_BATCHING = ("batch_size", "trainer.devices")


def override_key(override: str) -> str:
    """The config key a command-line override sets ('+a.b=1', '~a', 'a@pkg=x' -> 'a.b', 'a', 'a')."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def resume_config(cfg: DictConfig, command: str, batch_dependent: Callable[[DictConfig], bool]) -> tuple[DictConfig, Path]:
    """The interrupted run's config (its .hydra/config.yaml) with this command line's harmless
    overrides applied; any override that would change the samples is refused, naming the key.
    batch_dependent(stored config): whether its samples depend on which share a batch (then
    batch_size and trainer.devices are fixed too)."""
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        raise ConfigError("resume= continues one run; it cannot be combined with --multirun")
    run = Path(str(cfg.resume)).expanduser().resolve()
    stored_path = run / ".hydra" / "config.yaml"
    if not run.is_dir() or not stored_path.is_file():
        raise ConfigError(f"resume={cfg.resume}: not a `diffctl {command}` run directory (no {stored_path})")
    stored = read_run_config(stored_path, f"resume={cfg.resume}")
    if stored.get("resume"):
        raise ConfigError(f"{run} is the log directory of an earlier resume; resume {stored.resume} itself")
    if is_complete(run):
        raise ConfigError(f"{run} is already complete (its metrics.json is written and no unfinished batches are left); nothing to resume")
    merged = stored.copy()
    OmegaConf.set_struct(merged, False)
    batch_free = not batch_dependent(stored)
    for key in dict.fromkeys(override_key(o) for o in hydra_cfg.overrides.task):
        new, old = OmegaConf.select(cfg, key), OmegaConf.select(stored, key)
        free = key.split(".")[0] in RESUME_FREE or (batch_free and key in RESUME_BATCHING)
        if not free:
            plain_new = OmegaConf.to_container(new, resolve=True) if OmegaConf.is_config(new) else new
            plain_old = OmegaConf.to_container(old, resolve=True) if OmegaConf.is_config(old) else old
            if plain_new != plain_old:
                raise ConfigError(
                    f"resume: {key} is {plain_old!r} in {run} but {plain_new!r} here, which changes the samples; "
                    f"drop {key}= to continue that run (or start a new run without resume=)"
                )
        OmegaConf.update(merged, key, new, force_add=True)
    merged.resume = str(run)
    return merged, run


def is_complete(run: Path) -> bool:
    """A run that wrote its metrics.json and removed its finished batches: nothing left to do."""
    return (run / "metrics.json").is_file() and not (run / PARTIAL).is_dir()


def run_noise_version(recorded: dict | None) -> int:
    """The noise version (diffctl.noise) a run's manifest records; none recorded: a run made before
    counter-based noise, i.e. version 1 (one CPU generator per sample)."""
    version = (recorded or {}).get("noise", 1)
    if version not in NOISE_VERSIONS:
        raise ConfigError(f"resume: the run's manifest records noise version {version!r}, which this diffctl does not know "
                          f"(known: {', '.join(map(str, NOISE_VERSIONS))}); resume it with the diffctl that started it")  # fmt: skip
    return version


def manifest(out_dir: Path, ckpt: str | None, resuming: bool, noise: int, classifier: str | None = None) -> None:
    """On resume: the checkpoint (and classifier checkpoint) of the interrupted run, checked
    unchanged. Else: record them and the noise version."""
    path = out_dir / PARTIAL / MANIFEST
    if resuming and path.is_file():
        recorded = read_manifest(path)
        _check_unchanged(recorded.get("ckpt"), recorded.get("sha256"), "checkpoint")
        _check_unchanged(recorded.get("classifier"), recorded.get("classifier_sha256"), "classifier checkpoint")
        return
    if int(os.environ.get("RANK", "0") or 0) == 0:
        record = {"ckpt": ckpt, "sha256": file_sha256(ckpt) if ckpt else None, "noise": noise}
        if classifier is not None:
            record.update(classifier=classifier, classifier_sha256=file_sha256(classifier))
        atomic_write_json(path, record)


def _check_unchanged(file: str | None, sha256: str | None, what: str) -> None:
    if file is None:
        return
    if not Path(file).is_file():
        raise CheckpointError(f"resume: the run's {what} {file} no longer exists")
    if file_sha256(file) != sha256:
        raise CheckpointError(
            f"resume: {file} changed since the run started (sha256 differs; was training still writing it?); "
            "its samples would not match: start a new run"
        )


def kept(run: Path, command: str) -> str:
    """What an interrupted run left in its directory, for the line that ends it."""
    partial = run / PARTIAL
    if is_complete(run):
        return f"the run had already finished: its outputs are in {run}"
    return f"{finished_count(partial)} finished samples are kept in {partial}; continue with: diffctl {command} resume={run}"
