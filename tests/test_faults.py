"""Faults during training, on real processes and files: kill -9 while checkpoints are written,
SIGTERM/SIGINT, and NaN/Inf losses (stop and skip)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import load_ckpt, run_train, tiny_overrides

from diffctl.checkpoint import atomic_save, load_checkpoint
from diffctl.files import atomic_create

CKPT_NAME = re.compile(r"^(step_\d{7}|last)\.ckpt$")
TEMP_NAME = re.compile(r"^\..+\.\d+\.tmp$")


def start_train(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "diffctl", "train", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.0005):
    """Poll until predicate() is truthy; fail if the process exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited with {proc.returncode} before the awaited state:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(poll)
    proc.kill()
    pytest.fail("timed out waiting for the training process")


def listing(d: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(d)]
    except FileNotFoundError:
        return []


def assert_checkpoints_sound(ckpt_dir: Path) -> list[int]:
    """Every *.ckpt is a complete, loadable diffctl checkpoint with finite weights; temporaries are
    hidden *.tmp files. Returns the steps of the step checkpoints."""
    steps = []
    for name in listing(ckpt_dir):
        if name.endswith(".ckpt"):
            assert CKPT_NAME.match(name), f"unexpected checkpoint name {name}"
            ckpt = load_checkpoint(ckpt_dir / name)  # raises CheckpointError on a torn file
            assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
            if name.startswith("step_"):
                assert ckpt["global_step"] == int(name[5:12])
                steps.append(ckpt["global_step"])
        else:
            assert TEMP_NAME.match(name), f"unexpected file {name} in {ckpt_dir}"
    return sorted(steps)


# --- atomic checkpoints --------------------------------------------------------------------


def test_atomic_save_failure_keeps_the_previous_file(tmp_path):
    from diffctl.errors import CheckpointError

    path = tmp_path / "x.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(3)}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="previous file there is intact"):
        atomic_save({"state_dict": {"w": Unpicklable()}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert listing(tmp_path) == ["x.ckpt"]  # the temporary file is gone


@pytest.fixture
def other_fs_tmpdir(tmp_path):
    """A system temp directory on another filesystem than the run (as where /tmp is a tmpfs): a
    save that writes to $TMPDIR and then moves the file into place copies it, non-atomically."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        yield None
        return
    d = shm / f"diffctl-test-{os.getpid()}-{tmp_path.name}"
    d.mkdir()
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def test_sigkill_at_any_moment_leaves_only_loadable_checkpoints(tmp_path, other_fs_tmpdir):
    """kill -9 a real training process that saves every step, over and over: sometimes the moment a
    new file appears in the checkpoint directory (a write has begun), sometimes at a random moment.
    Each next run resumes in the same directory, where the killed run's temporaries lie."""
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    # A wider U-Net (about 25 MB per checkpoint) so that writing one takes long enough to be hit.
    args = [*tiny_overrides("unet"), "model.base_channels=48", "trainer.max_steps=100000", "checkpoint.every_n_steps=1",
            f"hydra.run.dir={run_dir}"]
    env = {"TMPDIR": str(other_fs_tmpdir)} if other_fs_tmpdir else {}
    rng = random.Random(0)
    caught_mid_write = 0
    last_steps: list[int] = []
    had_last = False
    for attempt in range(6):
        resume = [f"resume={run_dir}"] if (ckpt_dir / "last.ckpt").exists() else []
        proc = start_train([*args, *resume], tmp_path, env)
        try:
            if attempt % 2 == 0:  # the moment a new file appears, i.e. while a checkpoint is being written
                known = set(listing(ckpt_dir))

                def new_file():
                    names = set(listing(ckpt_dir))
                    fresh = names - known
                    known.update(names)
                    return fresh

                wait_for(new_file, proc)
            else:  # a random moment once this run has saved something
                before = max(last_steps, default=0)
                wait_for(lambda: any(n.startswith("step_") and int(n[5:12]) > before for n in listing(ckpt_dir) if n.endswith(".ckpt")), proc)
                time.sleep(rng.uniform(0.0, 0.3))  # randomizes the kill moment; nothing waits on it
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        names = listing(ckpt_dir)
        caught_mid_write += any(TEMP_NAME.match(n) for n in names)
        steps = assert_checkpoints_sound(ckpt_dir)
        if last_steps:  # nothing saved before was lost
            assert steps and steps[-1] >= last_steps[-1]
        last_steps = steps
        if had_last:  # once there, last.ckpt never goes missing (resume=<run dir> needs it)
            assert "last.ckpt" in names
        if "last.ckpt" in names:
            had_last = True
            assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] <= steps[-1]
        if caught_mid_write and attempt >= 3:
            break
    assert caught_mid_write, "no kill landed while a checkpoint was being written"
    if other_fs_tmpdir:  # nothing checkpoint-sized was left outside the run directory
        assert not [p for p in other_fs_tmpdir.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000]

    # The next run in that directory removes the stale temporaries and continues from last.ckpt.
    resumed_from = load_checkpoint(ckpt_dir / "last.ckpt")["global_step"]
    result = run_train(run_dir, [*args[:-3], f"trainer.max_steps={resumed_from + 2}", "checkpoint.every_n_steps=1", f"resume={run_dir}"])
    assert result["global_step"] == resumed_from + 2
    assert not [n for n in listing(ckpt_dir) if TEMP_NAME.match(n)]
    assert_checkpoints_sound(ckpt_dir)
    assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == resumed_from + 2


# --- SIGTERM / SIGINT ----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_with_how_to_resume(tmp_path, signum):
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    proc = start_train(
        [*tiny_overrides("unet"), "trainer.max_steps=100000", "checkpoint.every_n_steps=3", f"hydra.run.dir={run_dir}"], tmp_path
    )
    try:
        wait_for(lambda: (ckpt_dir / "step_0000003.ckpt").exists(), proc)  # training is under way
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 1, (out[-2000:], err[-3000:])
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if f"stopped by {name}" in line]
    assert len(lines) == 1, err[-3000:]
    assert f"Continue with: diffctl train resume={run_dir}" in lines[0]
    step = int(re.search(r"after step (\d+)", lines[0]).group(1))
    assert step >= 3
    # The interrupted step is saved (also between two regular saves) and last.ckpt points at it.
    assert load_checkpoint(ckpt_dir / f"step_{step:07d}.ckpt")["global_step"] == step
    assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == step
    assert_checkpoints_sound(ckpt_dir)
    assert "diffctl train: done" not in out  # no end-of-run summary for an interrupted run

    # Resuming as the message says continues from that step.
    result = run_train(tmp_path / "resumed", [*tiny_overrides("unet"), f"trainer.max_steps={step + 2}", f"resume={run_dir}"])
    assert result["global_step"] == step + 2


# --- NaN / Inf losses ----------------------------------------------------------------------


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at({5, 6}): the DDPM loss is NaN in the steps that start at those global steps."""
    from diffctl.objectives import DDPMObjective

    bad: set[int] = set()
    original = DDPMObjective.loss

    def loss(self, *args, step=None, **kwargs):
        value = original(self, *args, step=step, **kwargs)
        return value * float("nan") if step in bad else value

    monkeypatch.setattr(DDPMObjective, "loss", loss)

    def set_bad(steps):
        bad.clear()
        bad.update(steps)

    return set_bad


def test_nan_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, nan_at):
    from diffctl.module import NonFiniteLoss

    # The loss of the 7th step (global_step 6 -> 7) is NaN; the NaN is looked for every 4 steps
    # (so not every step), and before the save due at step 10, which must never be written.
    nan_at({6})
    overrides = [*tiny_overrides("unet"), "trainer.max_steps=20", "checkpoint.every_n_steps=5", "trainer.log_every_n_steps=4"]
    with pytest.raises(NonFiniteLoss) as info:
        run_train(tmp_path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert "the training loss of step 7 is nan" in message and "stopped at step 8" in message
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'step_0000005.ckpt'}" in message
    assert assert_checkpoints_sound(tmp_path / "checkpoints") == [5]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_nan_at_a_save_step_never_overwrites_the_good_checkpoint(tmp_path, nan_at):
    from diffctl.module import NonFiniteLoss

    nan_at({9})  # the step that ends at the save due at step 10
    with pytest.raises(NonFiniteLoss, match="the training loss of step 10 is nan"):
        run_train(tmp_path, [*tiny_overrides("unet"), "trainer.max_steps=20", "checkpoint.every_n_steps=5", "trainer.log_every_n_steps=50"])
    assert assert_checkpoints_sound(tmp_path / "checkpoints") == [5]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_nan_skip_skips_exactly_those_optimizer_steps(tmp_path, nan_at):
    nan_at({3, 6})
    result = run_train(tmp_path, [*tiny_overrides("unet"), "nan_policy=skip", "trainer.max_steps=8", "checkpoint.every_n_steps=1"])
    assert result["global_step"] == 8 and result["skipped_steps"] == 2
    ckpts = {s: load_ckpt(tmp_path / "checkpoints" / f"step_{s:07d}.ckpt") for s in range(1, 9)}
    assert ckpts[8]["diffctl"]["skipped_steps"] == 2
    assert_checkpoints_sound(tmp_path / "checkpoints")
    for before, after in ((2, 3), (3, 4), (5, 6), (6, 7)):
        a, b = ckpts[before]["state_dict"], ckpts[after]["state_dict"]
        unchanged = all(torch.equal(a[k], b[k]) for k in a if k.startswith(("denoiser.", "ema.")))
        # steps 4 and 7 (starting at global steps 3 and 6) changed nothing: weights, EMA, Adam state
        assert unchanged == (after in (4, 7)), (before, after)
    adam = lambda s: ckpts[s]["optimizer_states"][0]["state"][0]  # noqa: E731
    assert float(adam(4)["step"]) == float(adam(3)["step"]) == 3 and float(adam(8)["step"]) == 6
    assert torch.equal(adam(4)["exp_avg"], adam(3)["exp_avg"])


def test_nan_stop_from_the_command_line_is_one_line(tmp_path):
    """A learning rate that provably overflows: Adam moves every weight by about lr, so after one
    step at 1e30 the activations exceed float32's range and the loss of step 2 is inf or NaN."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "diffctl", "train", *tiny_overrides("unet"), "trainer.max_steps=20", "checkpoint.every_n_steps=1",
         "optim.lr=1e30", "optim.warmup_steps=0", "trainer.gradient_clip_val=null", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    match = re.search(r"the training loss of step (\d+) is (nan|inf|-inf); stopped at step (\d+)", errors[0])
    assert match, errors[0]
    bad = int(match.group(1))
    steps = assert_checkpoints_sound(run_dir / "checkpoints")
    assert steps == list(range(1, bad)) and f"last good checkpoint: {run_dir / 'checkpoints'}" in errors[0]


@pytest.mark.parametrize("slurm", [False, True], ids=["plain", "slurm"])
def test_sigterm_handler_leaves_slurm_auto_requeue_to_lightning(tmp_path, monkeypatch, slurm):
    """Under SLURM (auto-requeue), Lightning's SIGTERM/SIGUSR1 handlers stay in place and a SIGTERM
    still ends in a checkpoint at the step and TrainingInterrupted; elsewhere diffctl's handler runs."""
    from diffctl.callbacks import StepCheckpoint, TrainingInterrupted
    from diffctl.module import DiffusionModule

    if slurm:
        for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
                           "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
            monkeypatch.setenv(key, value)
    seen = {}
    original = DiffusionModule.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            seen["sigterm"] = signal.getsignal(signal.SIGTERM)
            seen["sigusr1"] = signal.getsignal(signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread's Python handler
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after step 3"):
        run_train(tmp_path, [*tiny_overrides("unet"), "trainer.max_steps=50"])
    handler = seen["sigterm"]
    if slurm:
        names = [getattr(h, "__name__", "") for h in getattr(handler, "signal_handlers", [])]
        assert "_sigterm_handler_fn" in names  # Lightning's "bypass SIGTERM" of auto-requeue
        assert "_slurm_sigusr_handler_fn" in [getattr(h, "__name__", "") for h in seen["sigusr1"].signal_handlers]
    else:
        assert getattr(handler, "__self__", None).__class__ is StepCheckpoint
    assert load_checkpoint(tmp_path / "checkpoints" / "step_0000003.ckpt")["global_step"] == 3
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored after fit


def test_sigterm_during_gradient_accumulation_stops_at_the_step_boundary_and_resumes_exactly(tmp_path, monkeypatch):
    from test_train import assert_same_training_state

    from diffctl.callbacks import TrainingInterrupted
    from diffctl.module import DiffusionModule

    overrides = [*tiny_overrides("unet"), "trainer.accumulate_grad_batches=3", "trainer.max_steps=6", "model.dropout=0.2"]
    run_train(tmp_path / "full", overrides)
    original = DiffusionModule.training_step
    sent = []

    def training_step(self, batch, batch_idx):
        if self.global_step == 2 and batch_idx % 3 == 0 and not sent:  # first micro-batch of step 3
            sent.append(batch_idx)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)
    with pytest.raises(TrainingInterrupted, match="after step 3;"):
        run_train(tmp_path / "stopped", overrides)
    assert sent and assert_checkpoints_sound(tmp_path / "stopped" / "checkpoints") == [3]
    monkeypatch.setattr(DiffusionModule, "training_step", original)
    run_train(tmp_path / "resumed", [*overrides, f"resume={tmp_path / 'stopped'}"])
    assert_same_training_state(
        load_ckpt(tmp_path / "full" / "checkpoints" / "last.ckpt"), load_ckpt(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    )


def test_unknown_nan_policy_is_a_config_error(tmp_path):
    from diffctl.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape("nan_policy must be one of stop | skip, got 'ignore'")):
        run_train(tmp_path, [*tiny_overrides("unet"), "nan_policy=ignore"])
    assert not (tmp_path / "checkpoints").exists()


def test_atomic_create_never_replaces_a_file_and_leaves_no_temporary(tmp_path):
    """likelihood.json and exports are made with atomic_create: a name taken meanwhile (another
    process) is an error, the file there keeps its bytes, and no temporary is left behind."""
    target = tmp_path / "result.json"
    atomic_create(target, lambda f: f.write(b"first"))
    assert target.read_bytes() == b"first"
    with pytest.raises(FileExistsError):
        atomic_create(target, lambda f: f.write(b"second"))
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
