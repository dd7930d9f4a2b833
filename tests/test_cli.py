"""The real `diffctl` command in subprocesses: help, errors, multirun, DDP, and an installed wheel."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_ckpt, run_cli, subtree, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_commands_and_groups(tmp_path):
    out = run_cli(["--help"], tmp_path)
    assert out.returncode == 0
    assert "train" in out.stdout
    for group, choice in [("model", "dit"), ("sde", "vpsub"), ("objective", "consistency"), ("data", "digits")]:
        line = next(l for l in out.stdout.splitlines() if l.strip().startswith(group + " "))
        assert choice in line


def test_train_help_lists_config_groups_and_choices(tmp_path):
    out = run_cli(["train", "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "diffctl train" in out.stdout
    for text in ["model: dit, gmm, unet", "sde: linear, ve, vp, vpsub", "objective: consistency, ddpm, edm, flow, ncsn, progressive"]:
        assert text in out.stdout


def test_unknown_group_choice_lists_valid_choices(tmp_path):
    out = run_cli(["train", "model=resnet"], tmp_path)
    assert out.returncode != 0
    assert "model/resnet" in out.stderr and "dit" in out.stderr and "unet" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.ckpt"))


def test_user_error_is_one_line_without_traceback(tmp_path):
    out = run_cli(["train", *tiny_overrides("unet"), "data=imagefolder", f"data.root={tmp_path / 'missing'}"], tmp_path)
    assert out.returncode == 1
    assert "error:" in out.stderr and "missing" in out.stderr
    assert "Traceback" not in out.stderr


def test_multirun_creates_one_directory_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli(["train", "--multirun", *tiny_overrides("unet"), "sde=vp,ve", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    sdes = [load_ckpt(sweep / j / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]["sde"]["_target_"] for j in jobs]
    assert sdes == ["diffctl.sde.VPSDE", "diffctl.sde.VESDE"]


def _final_weights(run_dir):
    return subtree(load_ckpt(run_dir / "checkpoints" / "last.ckpt")["state_dict"], "denoiser.")


@pytest.mark.slow
def test_ddp_two_processes_matches_one_process_on_same_global_batch(tmp_path):
    """2 gloo processes x batch 8 follow the same trajectory as 1 process x batch 16."""
    common = [*tiny_overrides("unet"), "trainer.max_steps=4", "optim.warmup_steps=0", "optim.lr=1e-3"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    a = run_cli(["train", *common, "data.batch_size=16", f"hydra.run.dir={single}"], tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_cli(["train", *common, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8", f"hydra.run.dir={ddp}"], tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    wa, wb = _final_weights(single), _final_weights(ddp)
    # Gradients are averaged over ranks in a different summation order: equal up to float rounding.
    moved = max(float((wa[k] - load_ckpt(single / "checkpoints" / "last.ckpt")["state_dict"]["ema." + k]).abs().max()) for k in wa)
    assert moved > 0
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    # Only rank 0 writes: one run directory with one set of outputs.
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["last.ckpt", "step_0000004.ckpt"]


@pytest.mark.slow
def test_multirun_with_ddp_has_no_duplicate_directories(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli(
        ["train", "--multirun", *tiny_overrides("unet"), "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8",
         "sde=vp,ve", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    # DDP ranks > 0 must not have started their own run directories or sweeps.
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_config_tree_found_from_installed_wheel(tmp_path):
    """Build the wheel, install it into a separate directory and run from elsewhere. Built from a copy of
    the checkout's files: setuptools writes build/ and *.egg-info/ next to the sources, which in the
    checkout would rewrite the editable install's metadata under the feet of parallel test workers."""
    wheels, site, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".*", "build", "dist", "outputs", "multirun", "wandb",
                                                              "lightning_logs", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(wheels.glob("diffctl-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    assert (site / "diffctl" / "conf" / "train.yaml").is_file()
    assert (site / "diffctl" / "conf" / "model" / "dit.yaml").is_file()
    env = {"PYTHONPATH": str(site)}
    where = run_cli(["--help"], tmp_path, env=env)
    assert where.returncode == 0
    probe = subprocess.run(
        [sys.executable, "-c", "import diffctl, diffctl.cli as c; print(diffctl.__file__); print(c.config_dir())"],
        cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, check=True,
    )
    module_file, conf = probe.stdout.split()
    assert module_file.startswith(str(site)) and conf.startswith(str(site))
    run_dir = tmp_path / "run"
    out = run_cli(["train", *tiny_overrides("dit"), "trainer.max_steps=2", f"hydra.run.dir={run_dir}"], tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_optuna_sweep_runs_trials_and_reports_best(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper (the optuna extra) not installed")
    sweep = tmp_path / "sweep"
    out = run_cli(
        ["train", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
         *tiny_overrides("unet"), f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in results and "optim.lr" in results and "best_value" in results


@pytest.mark.slow
def test_torchrun_launch_shares_one_run_directory(tmp_path):
    """torchrun starts every rank itself (each runs Hydra); they must land in one run directory."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diffctl", "train",
           *tiny_overrides("unet"), "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs" / "train").iterdir()]
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-")
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert load_ckpt(runs[0] / "checkpoints" / "last.ckpt")["global_step"] == 3
