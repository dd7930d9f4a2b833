"""Signals and memory limits in every command, on real processes (issue 14, section 4):
SIGTERM/SIGINT of `diffctl sample` (1 and 2 processes), likelihood and fid-stats stop every process
of the command, keep what is finished, exit 1 with one line saying how to continue, and the
interrupted sample run resumes to the samples of an uninterrupted one; a config that cannot fit in
memory is refused in one line, quickly, without allocating it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import edm_detector, run_cli, run_sample

NO_METRICS = ["metrics.names=[]"]


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`diffctl <args>` as the leader of its own process group (as a shell job is); output to a file."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "diffctl", *args], cwd=cwd, env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_until(predicate, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited with {proc.returncode} too early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the command to get going"
        time.sleep(0.01)


def alive_in_group(pgid: int) -> list[str]:
    """Processes of process group `pgid` that are still running (zombies waiting for init are dead)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            found.append(f"{entry} {stat[: stat.rindex(')') + 1]} {fields[0]}")
    return found


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    """Wait for the command; then assert that no process of its group outlives it (a few seconds for
    multiprocessing's resource tracker, which leaves when its last user has gone)."""
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = alive_in_group(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
    return rc, log.read_text()


def one_line(text: str, needle: str) -> str:
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if needle in line]
    assert len(lines) == 1, text[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _arrays(out: Path) -> dict:
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        return {k: (z[k].dtype.str, z[k].shape, z[k].tobytes()) for k in z.files}


# --- sample ---------------------------------------------------------------------------------------


ARGS = ["sampler=ddpm", "steps=60", "num_samples=12", "batch_size=2", "seed=5", "progress_bar=false", "trainer.accelerator=cpu",
        *NO_METRICS]


@pytest.fixture(scope="module")
def whole(trained, tmp_path_factory):
    """The samples of an uninterrupted run, in one process."""
    out = tmp_path_factory.mktemp("whole")
    run_sample(out, [f"ckpt={trained[1]}", *ARGS, "trainer.devices=1"])
    return _arrays(out)


@pytest.mark.parametrize(
    "devices,signum,target",
    [(2, signal.SIGTERM, "parent"), (1, signal.SIGINT, "group"), (2, signal.SIGTERM, "worker")],
    ids=["2proc-SIGTERM-parent", "1proc-SIGINT-terminal", "2proc-SIGTERM-one-worker"],
)
def test_signalled_sample_stops_every_process_keeps_its_shards_and_resumes_to_the_same_samples(trained, whole, tmp_path, devices, signum, target):
    run, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(["sample", f"ckpt={trained[1]}", *ARGS, f"trainer.devices={devices}", f"hydra.run.dir={run}"], tmp_path, log)
    wait_until(lambda: list((run / "partial").glob("shard-*.npz")), proc, log)  # sampling is under way
    if target == "parent":
        proc.send_signal(signum)
    elif target == "group":  # Ctrl-C in a terminal: every process of the foreground group gets it
        os.killpg(proc.pid, signum)
    else:
        os.kill(workers_of(proc.pid)[-1], signum)
    rc, out = finish(proc, log)
    assert rc == 1, out[-3000:]
    if target == "worker":
        line = one_line(out, f"was stopped by {signal.Signals(signum).name}")
        assert line.startswith("error: sampling process ") and "the other processes were stopped" in line
    else:
        line = one_line(out, f"stopped by {signal.Signals(signum).name}")
    assert line.endswith(f"continue with: diffctl sample resume={run}"), line
    shards = list((run / "partial").glob("shard-*.npz"))
    assert shards and not (run / "samples.npz").exists() and not (run / "metrics.json").exists()
    assert f"{2 * len(shards)} finished samples are kept in {run / 'partial'}" in line
    if target == "worker":  # resuming is the same as after the other cases
        return
    resumed = run_cli(["sample", f"resume={run}", "progress_bar=false"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["resumed_samples"] == 2 * len(shards)
    assert _arrays(run) == whole


# --- likelihood, fid-stats -----------------------------------------------------------------------


def _stop_after_start(args: list[str], tmp_path: Path, signum: int, started: str | None = None) -> tuple[int, str, Path]:
    """Signal the command once `started` is in its output (None: Hydra has written the run's config), a second later."""
    run, log = tmp_path / "run", tmp_path / "run.log"
    proc = start([*args, f"hydra.run.dir={run}"], tmp_path, log)
    wait_until(lambda: started in log.read_text() if started else (run / ".hydra" / "config.yaml").is_file(), proc, log)
    time.sleep(1 if started else 5)  # into the work (each run takes minutes)
    assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signum)
    rc, out = finish(proc, log)
    return rc, out, run


def test_signalled_likelihood_exits_1_with_one_line_and_writes_nothing(tmp_path):
    args = ["likelihood", "model=gmm", "num_batches=100000", "batch_size=4", "trace=exact", "progress_bar=false"]
    rc, out, run = _stop_after_start(args, tmp_path, signal.SIGTERM)
    assert rc == 1, out[-3000:]
    line = one_line(out, "stopped by SIGTERM")  # in the work or, on a slow machine, in the imports before it
    assert ("nothing was written" in line or "wrote nothing" in line) and "run the command again" in line
    assert not (run / "likelihood.json").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_signalled_fid_stats_exits_1_with_one_line_and_leaves_no_statistics(tmp_path):
    args = ["fid-stats", "metrics.detector=edm", f"metrics.detector_path={edm_detector()}", "metrics.batch_size=4",
            f"metrics.cache_dir={tmp_path / 'cache'}", "metrics.progress_bar=false"]
    rc, out, run = _stop_after_start(args, tmp_path, signal.SIGINT, started="computing reference statistics")
    assert rc == 1, out[-3000:]
    line = one_line(out, "stopped by SIGINT")
    assert "ref_stats.npz was not written" in line and "run the command again" in line
    assert not (run / "ref_stats.npz").exists()
    assert not list((tmp_path / "cache").glob("**/*.npz"))  # no half-computed statistics cached


# --- memory ---------------------------------------------------------------------------------------


def test_resolution_that_cannot_fit_is_refused_in_one_line_without_allocating_it(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    log = tmp_path / "train.log"
    args = ["train", "data=imagefolder", f"data.root={folder}", "data.resolution=100000", "data.batch_size=2",
            "trainer=cpu", "logger=none", "progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}"]
    t0 = time.monotonic()
    proc = start(args, tmp_path, log)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed, out = time.monotonic() - t0, log.read_text()
    assert proc.returncode == 1, out[-3000:]
    line = one_line(out, "data.resolution=100000 with data.batch_size=2 needs about")
    assert "TiB" in line and "available RAM (MemAvailable" in line and "memory_check=false" in line
    fit = int(line.split("about data.resolution=")[1].split()[0])  # what would fit
    assert 8 <= fit < 100000
    assert usage.ru_maxrss * 1024 < 1.5 * 2**30, usage.ru_maxrss  # imports (~0.5 GB), not the terabytes
    assert elapsed < 60


def test_activation_estimate_is_within_a_factor_of_a_real_measurement(tmp_path):
    """The meta-device estimate against the peak RSS a real CPU forward + backward adds (independent:
    the kernel's count of the process's resident pages)."""
    from diffctl.build import instantiate_config
    from diffctl.config import compose_config
    from diffctl.memory_estimates import network_bytes

    overrides = ["model=unet", "model.base_channels=32"]
    cfg = compose_config("train", overrides, tmp_path)
    net = instantiate_config(cfg.model, "model", in_channels=3, resolution=64, num_classes=0)
    estimate = network_bytes(net, 8, (3, 64, 64), 0, "params")
    script = f"""
import gc, re, torch
torch.set_num_threads(1)
from pathlib import Path
from diffctl.build import instantiate_config
from diffctl.config import compose_config
status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
net = instantiate_config(compose_config("train", {overrides!r}, Path({str(tmp_path)!r})).model, "model", in_channels=3, resolution=64, num_classes=0)
x, t = torch.randn(8, 3, 64, 64), torch.rand(8)
with torch.no_grad():
    net(x[:1, :, :8, :8], t[:1])  # libraries' lazy allocations before the baseline
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS: imports' peak is not ours
before = status("VmRSS")
net(x, t).float().square().mean().backward()
print(status("VmHWM") - before)
"""
    real = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()[-1])
    ratio = real / estimate
    assert 0.7 < ratio < 2.5, (real, estimate)  # measured 1.37 for this config (0.82-1.38 over U-Net/DiT, train/inference)


def test_normal_configs_are_not_refused_and_the_check_is_cheap(tmp_path, monkeypatch):
    """Offline default and the CIFAR-10 presets at their real sizes, on a 16 GiB machine and GPU."""
    import diffctl.memory as memory
    from diffctl.config import compose_config
    from diffctl.train import build_datamodule

    monkeypatch.setattr(memory, "available", lambda device: (16 * 2**30, "test"))
    for overrides in ([], ["experiment=cifar10_ddpm", "data.download=true", f"data.root={tmp_path}"]):
        cfg = compose_config("train", overrides, tmp_path)
        dm = build_datamodule(cfg)
        shape = {"channels": dm.channels, "resolution": dm.resolution, "num_classes": 0}
        for accelerator in ("cpu", "gpu"):
            cfg.trainer.accelerator = accelerator
            t0 = time.perf_counter()
            memory.check_train(cfg, dm, shape)
            assert time.perf_counter() - t0 < 3  # ~0.5 s (quickstart) to ~1 s (35.7M-parameter DDPM U-Net) here
    cfg.data.batch_size = 100000  # and the same check refuses what does not fit, naming the batch that does
    dm = build_datamodule(cfg)
    with pytest.raises(memory.MemoryRefused, match=r"at most data.batch_size=\d+ fits"):
        memory.check_train(cfg, dm, shape)


def test_training_estimate_counts_the_consistency_target_network(tmp_path, monkeypatch):
    """Consistency training keeps a target copy of the network: one more weight copy than DDPM's
    parameter + gradient + Adam pair + EMA (4 -> 5)."""
    import diffctl.memory as memory
    from diffctl.config import compose_config
    from diffctl.train import build_datamodule

    seen = {}
    monkeypatch.setattr(memory, "_split", lambda parts, *rest: seen.update(weights=parts["weights and optimizer state"]))
    weights = {}
    for objective in ("ddpm", "consistency"):
        cfg = compose_config("train", [f"objective={objective}", "trainer=cpu"], tmp_path)
        dm = build_datamodule(cfg)
        memory.check_train(cfg, dm, {"channels": dm.channels, "resolution": dm.resolution, "num_classes": 0})
        weights[objective] = seen["weights"]
    assert weights["consistency"] * 4 == weights["ddpm"] * 5


def test_signal_during_startup_is_one_line_too(tmp_path):
    """SIGTERM once Hydra has set the run up, while the command imports its modules (seconds: torch,
    Lightning), before its own handler is installed."""
    log, run = tmp_path / "run.log", tmp_path / "run"
    proc = start(["likelihood", "model=gmm", f"hydra.run.dir={run}"], tmp_path, log)
    wait_until(lambda: (run / ".hydra" / "config.yaml").is_file(), proc, log, timeout=60)  # written inside the guard of cli.main
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc, log)
    assert rc == 1, out[-3000:]
    assert "run the command again" in one_line(out, "stopped by SIGTERM")
