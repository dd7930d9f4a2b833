"""`--multirun hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml, hydra-submitit-launcher). No cluster here:
the launcher is built from the composed config, a sweep is submitted to a stand-in `sbatch` that keeps the
batch script and refuses the job, and a real sweep runs through submitit's local executor."""

import os
import re
import stat

import pytest
from helpers import run_cli, tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.utils import instantiate

from diffctl.cli import config_dir

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def test_slurm_launcher_config_composes_and_the_plugin_loads(tmp_path):
    found = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    assert SLURM_LAUNCHER in found  # the plugin of the slurm (and test) extra is installed and discovered
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=gpu"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert f"{type(launcher).__module__}.{type(launcher).__name__}" == SLURM_LAUNCHER
    # one SLURM task per DDP rank: Lightning's SLURM environment then sees the world size the trainer asks for
    assert (launcher.params["tasks_per_node"], launcher.params["nodes"]) == (4, 2)
    assert launcher.params["partition"] == "gpu" and launcher.params["max_num_timeout"] == 0


def _fake_slurm(bin_dir, keep):
    """An `sbatch` that keeps the script it is given and refuses the job, as a full cluster would, and an
    `srun` (submitit looks for one before submitting) that never runs."""
    bin_dir.mkdir()
    for name, body in (("sbatch", f'cp "$1" "{keep}"\necho "sbatch: error: test stand-in, no cluster" >&2'), ("srun", "")):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\nexit 1\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slow
def test_sweep_is_submitted_as_one_job_array_with_one_task_per_rank(tmp_path):
    keep, sweep = tmp_path / "submitted.sh", tmp_path / "sweep"
    env = _fake_slurm(tmp_path / "bin", keep)
    args = ["train", "--multirun", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
            "trainer=ddp", "trainer.devices=2", "model=unet,dit", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    out = run_cli(args, tmp_path, env=env, timeout=120)
    assert out.returncode != 0 and "test stand-in, no cluster" in out.stdout + out.stderr
    text = keep.read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", text, re.M))
    assert flags["array"] == "0-1%2"  # both sweep jobs in one array (submitit caps array_parallelism at the job count)
    assert (flags["partition"], flags["gpus-per-node"], flags["ntasks-per-node"], flags["nodes"]) == ("gpu", "2", "2", "1")
    assert flags["time"] == "1440" and flags["job-name"] == "train"
    assert flags["output"].startswith(f"{sweep}/.submitit/")  # SLURM's logs beside the runs
    assert re.search(r"^srun .*submitit\.core\._submit", text, re.M)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_sweep_runs_through_submitit_local_executor(tmp_path):
    """The same submitit path, executed: each job is pickled, run in its own process and its result returned."""
    sweep = tmp_path / "sweep"
    args = ["train", "--multirun", "hydra/launcher=submitit_local", *tiny_overrides("unet"), "trainer.max_steps=2",
            "sde=vp,ve", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    out = run_cli(args, tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for job, sde in (("0", "vp"), ("1", "ve")):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert f"- sde={sde}" in (sweep / job / ".hydra" / "overrides.yaml").read_text().splitlines()
    assert list((sweep / ".submitit").iterdir())  # submitit's job folders, where its logs and results live


def test_slurm_launcher_without_slurm_is_a_one_line_error(tmp_path):
    """Off a cluster submitit finds no `srun` and raises; the user gets one line saying so, not its traceback."""
    env = {"PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (os.path.exists(os.path.join(p, "srun"))))}
    out = run_cli(["train", "--multirun", "hydra/launcher=slurm", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, env=env, timeout=120)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    assert "error:" in out.stderr and "srun" in out.stderr and "hydra/launcher=slurm" in out.stderr
