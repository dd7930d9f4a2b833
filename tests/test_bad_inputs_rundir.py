"""Bad inputs, issue 14 section 1: a run directory is never reused silently, and only one process
writes it. Each case runs the real CLI on real files: a used directory is refused in one line and
left byte-identical (.hydra/ included: the refusal comes before Hydra writes into it), a directory
in use is refused naming the holder's PID, and the lock goes with its process however it ends."""

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import run_cli, run_sample, run_train, tiny_overrides

from diffctl.checkpoint import load_checkpoint
from diffctl.errors import ConfigError
from diffctl.rundir import LOCK

GMM = ["model=gmm", "num_samples=4", "steps=2", "progress_bar=false"]
TRAIN = [*tiny_overrides("unet"), "trainer.max_steps=2"]


def _one_line_error(out, *fragments):
    assert out.returncode == 1, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "Warning" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _snapshot(directory):
    """Every file under directory (hidden ones too) -> sha256 of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished `diffctl train` run and a finished `diffctl sample` run, both made by the CLI."""
    root = tmp_path_factory.mktemp("finished")
    train_dir, sample_dir = root / "train", root / "sample"
    out = run_cli(["train", *TRAIN, f"hydra.run.dir={train_dir}"], root)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_cli(["sample", *GMM, f"hydra.run.dir={sample_dir}"], root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, train_dir, sample_dir


REUSES = {  # command line into a used directory -> what the one line says
    "train into a finished training run": ("train", ["train", *TRAIN, "seed=1"], ["already holds a training run", "checkpoints/last.ckpt",
                                                                                 "`diffctl train resume=", "a new hydra.run.dir"]),
    "sample into a finished sample run": ("sample", ["sample", *GMM, "seed=1"], ["already holds a run", "samples.npz", "a new hydra.run.dir"]),
    "sample into a training run": ("train", ["sample", *GMM], ["already holds a run", "checkpoints/last.ckpt"]),
    "export into a training run": ("train", ["export", "ckpt=TRAIN"], ["already holds a run", "a new hydra.run.dir"]),
}


@pytest.mark.parametrize("case", list(REUSES))
def test_a_used_run_directory_is_refused_and_left_byte_identical(finished, case):
    root, train_dir, sample_dir = finished
    kind, args, fragments = REUSES[case]
    target = train_dir if kind == "train" else sample_dir
    before = _snapshot(target)
    args = [a.replace("TRAIN", str(train_dir)) for a in args]
    _one_line_error(run_cli([*args, f"hydra.run.dir={target}"], root), str(target), *fragments)
    assert _snapshot(target) == before


def test_in_process_callers_are_refused_too(finished):
    """scripts/ and tests compose the config in-process (diffctl.config): no Hydra callback runs there."""
    _, _, sample_dir = finished
    before = _snapshot(sample_dir)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_sample(sample_dir, [*GMM, "seed=3"])
    assert _snapshot(sample_dir) == before


def test_export_never_replaces_a_file_the_user_made(finished, tmp_path):
    _, train_dir, _ = finished
    mine = tmp_path / "notes"  # no .safetensors suffix: export would have taken it for a directory
    mine.write_text("the user's own file\n")
    out = run_cli(["export", f"ckpt={train_dir}", f"out={mine}", f"hydra.run.dir={tmp_path / 'log'}"], tmp_path)
    _one_line_error(out, f"out={mine} is an existing file", "nothing is overwritten")
    assert mine.read_text() == "the user's own file\n"


def _start(args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "diffctl", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_trainings_started_at_once_into_one_directory_one_runs(tmp_path):
    run_dir = tmp_path / "run"
    # long enough (about 2 s of steps) that the later starter finds the lock held, not a finished run
    procs = {seed: _start(["train", *tiny_overrides("unet"), "trainer.max_steps=40", f"seed={seed}", f"hydra.run.dir={run_dir}"], tmp_path)
             for seed in (1, 2)}
    outs = {seed: (p, *p.communicate(timeout=300)) for seed, p in procs.items()}
    codes = sorted(p.returncode for p, _, _ in outs.values())
    assert codes == [0, 1], {s: (p.returncode, err[-2000:]) for s, (p, _, err) in outs.items()}
    (winner, (wproc, _, _)), = [(s, o) for s, o in outs.items() if o[0].returncode == 0]
    (_, _, lerr), = [o for o in outs.values() if o[0].returncode == 1]
    lines = [line for line in lerr.splitlines() if line.strip()]
    assert lines == [f"error: {run_dir} is in use by another diffctl process (PID {wproc.pid}, see {LOCK}); "
                     "wait for it to end, or choose another hydra.run.dir"], lerr
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 40 and ckpt["hyper_parameters"]["config"]["seed"] == winner


def test_a_running_run_is_refused_with_its_pid_and_a_killed_one_can_be_resumed_in_place(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start(["train", *tiny_overrides("unet"), "trainer.max_steps=100000", "checkpoint.every_n_steps=1", f"hydra.run.dir={run_dir}"],
                  tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not last.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:] if proc.poll() is not None else "timeout"
            time.sleep(0.05)
        out = run_cli(["sample", *GMM, f"hydra.run.dir={run_dir}"], tmp_path)  # any command, while the training runs
        _one_line_error(out, f"is in use by another diffctl process (PID {proc.pid}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    step = load_checkpoint(last)["global_step"]
    # the kernel dropped the dead process's lock: its own directory continues from its last.ckpt
    out = run_cli(["train", *tiny_overrides("unet"), f"trainer.max_steps={step + 1}", "checkpoint.every_n_steps=1",
                   f"resume={run_dir}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_checkpoint(last)["global_step"] == step + 1
    # continuing from an earlier checkpoint in place would rewrite the later ones: refused (in-process: same code)
    with pytest.raises(ConfigError, match="already holds a training run"):
        run_train(run_dir, [*tiny_overrides("unet"), f"resume={run_dir / 'checkpoints' / f'step_{step:07d}.ckpt'}"])


def _hold_lock(directory):
    """Take the directory's lock in this (test) process, as a running diffctl would."""
    directory.mkdir(parents=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def test_ranks_above_zero_write_into_the_directory_rank_zero_holds(tmp_path, monkeypatch):
    """torchrun/SLURM ranks and Lightning's DDP children run the command again into rank 0's
    directory: only rank 0 (or the launcher) claims it; the others neither lock nor refuse."""
    run_dir = tmp_path / "run"
    fd = _hold_lock(run_dir)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another diffctl process \(PID {os.getpid()},"):
            run_sample(run_dir, GMM)
        # a Lightning DDP child (LOCAL_RANK), as a real process: Hydra callback and task both let it in
        out = run_cli(["likelihood", "model=gmm", "num_batches=1", "batch_size=2", "progress_bar=false",
                       f"hydra.run.dir={run_dir}"], tmp_path, env={"LOCAL_RANK": "1"})
        assert out.returncode == 0 and (run_dir / "likelihood.json").is_file(), out.stderr[-3000:]
        for key in ("RANK", "SLURM_PROCID"):  # torchrun and SLURM ranks, in-process (the same code path)
            with monkeypatch.context() as env:
                env.setenv(key, "1")
                fd2 = _hold_lock(run_dir / key)
                try:
                    run_sample(run_dir / key, GMM)
                finally:
                    os.close(fd2)
    finally:
        os.close(fd)


def test_multirun_jobs_get_their_own_directories_and_a_used_sweep_is_refused(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli(["sample", "--multirun", *GMM, "seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = (np.load(sweep / job / "samples.npz")["samples"] for job in ("0", "1"))
    assert not np.array_equal(first, second)  # two jobs, two seeds, two directories
    before = _snapshot(sweep)
    out = run_cli(["sample", "--multirun", *GMM, "seed=2,3", f"hydra.sweep.dir={sweep}"], tmp_path)
    _one_line_error(out, str(sweep), "already holds a run", "a new hydra.sweep.dir")
    assert _snapshot(sweep) == before
