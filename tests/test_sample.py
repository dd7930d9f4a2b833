"""`diffctl sample` from checkpoints made by `diffctl train`: every sampler, guidance, multi-process
sampling, sweeps and errors (in-process where possible, the real CLI where the user's view matters)."""

import json

import numpy as np
import pytest
from helpers import interrupted_run, run_cli, run_sample, run_train, tiny_overrides

from diffctl.errors import ConfigError

NO_METRICS = ["metrics.names=[]"]


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cond") / "run"
    run_train(run_dir, [*tiny_overrides("unet"), "trainer.max_steps=30", "optim.lr=3e-3", "conditional=true", "label_dropout=0.2"])
    return run_dir


def _load(out):
    return np.load(out / "samples.npz"), json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    "overrides,nfe",
    [
        (["sampler=ddpm"], 4),
        (["sampler=ddim", "sampler.eta=0.5", "sampler.spacing=trailing"], 4),
        (["sampler=pc"], 8),
        (["sampler=pc", "sampler.predictor=none", "sampler.corrector=ald", "sampler.corrector_steps=2"], 9),
        (["sampler=ode", "sampler.solver=heun"], 7),
        (["sampler=ode", "sampler.solver=rk4"], 13),
        (["sampler=ode", "sampler.solver=dpmpp_2m"], 4),
        (["sampler=ode", "sampler.solver=adaptive", "sampler.rtol=1e-3", "sampler.atol=1e-3"], None),
    ],
)
def test_every_sampler_writes_npz_grid_and_metrics(trained, tmp_path, overrides, nfe):
    _, run_dir = trained
    run_sample(tmp_path, [f"ckpt={run_dir}", *overrides, "steps=4", "num_samples=5", "batch_size=3", *NO_METRICS])
    arrays, metrics = _load(tmp_path)
    assert arrays["samples"].shape == (5, 8, 8, 1) and arrays["samples"].dtype == np.uint8
    assert (tmp_path / "samples.png").is_file()
    if nfe is not None:
        assert metrics["nfe_per_sample"] == nfe
    else:  # adaptive: dopri5 spends 6 evaluations per accepted step, plus the first and the final denoising
        assert metrics["nfe_per_sample"] >= 8
    assert metrics["num_samples"] == 5 and metrics["weights"] == "ema" and metrics["sampler"] == overrides[0].split("=")[1]


def test_same_images_whatever_the_batch_size_and_number_of_processes(trained, tmp_path):
    _, run_dir = trained
    common = [f"ckpt={run_dir}", "sampler=pc", "steps=3", "num_samples=7", "seed=3", *NO_METRICS]
    run_sample(tmp_path / "a", [*common, "batch_size=4"])
    run_sample(tmp_path / "b", [*common, "batch_size=2", "trainer.accelerator=cpu", "trainer.devices=2"])
    run_sample(tmp_path / "c", [*common, "batch_size=7", "seed=4"])
    a, b, c = (_load(tmp_path / d)[0]["samples"] for d in "abc")
    np.testing.assert_array_equal(a, b)  # 7 samples over 2 processes x batches of 2: none lost or repeated
    assert not np.array_equal(a, c)
    assert len({s.tobytes() for s in a}) == 7
    assert _load(tmp_path / "b")[1]["devices"] == 2


def test_class_labels_and_guidance(conditional, tmp_path):
    common = [f"ckpt={conditional}", "sampler=ddim", "steps=3", "num_samples=6", *NO_METRICS]
    run_sample(tmp_path / "plain", common)
    run_sample(tmp_path / "guided", [*common, "guidance=3"])
    run_sample(tmp_path / "one", [*common, "class_label=7"])
    plain, guided, one = (_load(tmp_path / d) for d in ("plain", "guided", "one"))
    assert plain[0]["labels"].tolist() == [0, 1, 2, 3, 4, 5]  # balanced round-robin
    assert one[0]["labels"].tolist() == [7] * 6
    assert not np.array_equal(plain[0]["samples"], guided[0]["samples"])
    assert plain[1]["nfe_per_sample"] == guided[1]["nfe_per_sample"] == 3  # both halves in one batched call
    with pytest.raises(ConfigError, match="class_label must be in"):
        run_sample(tmp_path / "bad", [*common, "class_label=10"])


def test_guidance_needs_a_conditional_checkpoint_with_label_dropout(trained, tmp_path):
    _, run_dir = trained
    with pytest.raises(ConfigError, match="guidance needs a class-conditional model"):
        run_sample(tmp_path, [f"ckpt={run_dir}", "guidance=2", *NO_METRICS])


def test_sweep_over_samplers_and_steps_gives_one_row_per_job(trained):
    root, run_dir = trained
    result = run_cli(["sample", "--multirun", f"ckpt={run_dir}", "sampler=ddpm,ode", "steps=2,3", "num_samples=2",
                      "progress_bar=false", *NO_METRICS, "hydra.sweep.dir=sweep"], root)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((root / "sweep" / "summary.json").read_text())
    assert sorted((r["sampler"], r["steps"], r["nfe_per_sample"]) for r in rows) == [("ddpm", 2, 2), ("ddpm", 3, 3), ("ode", 2, 2), ("ode", 3, 3)]  # ode: dpmpp_2m, one NFE per step
    table = result.stdout[result.stdout.index("diffctl sample sweep (4 jobs)"):]
    assert all(word in table for word in ("sampler", "steps", "nfe_per", "ddpm", "ode"))


def test_without_ckpt_uses_newest_checkpoint_under_outputs(trained, tmp_path):
    root, run_dir = trained
    result = run_cli(["sample", "steps=2", "num_samples=2", f"hydra.run.dir={tmp_path}", "progress_bar=false", *NO_METRICS], root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Using the newest checkpoint" in result.stdout and str(run_dir) in _load(tmp_path)[1]["checkpoint"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["sampler=consistency"], "sampler=consistency"),
        (["sampler=ddim", "sampler.eta=2"], "eta must be in [0, 1]"),
        (["steps=0"], "steps must be a positive integer"),
        (["sampler=ode", "sampler.solver=rk45"], "solver must be one of"),
    ],
)
def test_bad_options_are_one_line_errors(trained, tmp_path, args, message):
    root, run_dir = trained
    result = run_cli(["sample", f"ckpt={run_dir}", *args, f"hydra.run.dir={tmp_path}"], root)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_cli(["sample", f"ckpt={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 1 and "checkpoint not found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_torchrun_launch_samples_each_index_once(trained, tmp_path):
    """Under torchrun every rank runs the command; they join one process group and one output."""
    import os
    import subprocess
    import sys

    root, run_dir = trained
    args = ["sample", f"ckpt={run_dir}", "sampler=ddpm", "steps=2", "num_samples=5", "batch_size=2", "progress_bar=false", *NO_METRICS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diffctl", *args, "trainer.accelerator=cpu", "trainer.devices=2"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "sample").iterdir()
    run_sample(tmp_path / "single", [a for a in args if a != "sample"])
    np.testing.assert_array_equal(_load(run)[0]["samples"], _load(tmp_path / "single")[0]["samples"])
    assert _load(run)[1]["devices"] == 2


def test_metrics_without_weights_keep_the_samples_and_say_how_to_fix(trained, tmp_path):
    root, run_dir = trained
    out = tmp_path / "out"
    result = run_cli(["sample", f"ckpt={run_dir}", "steps=2", "num_samples=3", "progress_bar=false", f"hydra.run.dir={out}",
                      "metrics.detector=inception", f"metrics.inception_weights={tmp_path / 'missing.pth'}"], root)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "metrics.inception_weights" in result.stderr and "samples were saved" in result.stderr
    assert np.load(out / "samples.npz")["samples"].shape[0] == 3 and (out / "metrics.json").is_file()


# --- resumable sampling -------------------------------------------------------------------------


def _arrays(out):
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        return {k: (z[k].dtype.str, z[k].shape, z[k].tobytes()) for k in z.files}


def _same_run(a, b, *other):
    """samples.npz of a and b hold the same arrays byte for byte, and metrics.json agrees but for timing."""
    assert _arrays(a) == _arrays(b)
    skip = {"time_s", "images_per_s", "resumed_samples", *other}
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert {k: v for k, v in ma.items() if k not in skip} == {k: v for k, v in mb.items() if k not in skip}


def _start_and_kill(args, cwd, run, timeout=120):
    """Start `diffctl sample` as a real process group, SIGKILL it as soon as its first batch is on disk."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    log = cwd / "killed.log"
    with open(log, "wb") as out:  # a file, not a pipe nobody reads while polling
        proc = subprocess.Popen([sys.executable, "-m", "diffctl", *args], cwd=cwd, env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not list((run / "partial").glob("shard-*.npz")):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no finished batch appeared"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: spawned sampling workers too
        proc.wait()
    return sorted(p.name for p in (run / "partial").glob("shard-*.npz"))


@pytest.mark.parametrize("devices", [1, 2])
def test_sampling_killed_with_sigkill_resumes_to_the_same_samples(trained, tmp_path, devices):
    root, run_dir = trained
    # 4 batches of 0.1-0.3 s each on 2 busy cores: killed within ~10 ms of the first one on disk, the run is mid-way
    args = [f"ckpt={run_dir}", "sampler=ddpm", "steps=60", "num_samples=8", "batch_size=2", "seed=7", "progress_bar=false",
            "trainer.accelerator=cpu", f"trainer.devices={devices}", *NO_METRICS]
    run = tmp_path / "run"
    shards = _start_and_kill(["sample", *args, f"hydra.run.dir={run}"], tmp_path, run)
    assert 1 <= len(shards) < 4 and not (run / "samples.npz").exists(), shards  # really interrupted mid-run
    result = run_cli(["sample", f"resume={run}", "progress_bar=false"], tmp_path)
    assert result.returncode == 0, (shards, result.stdout[-2000:], result.stderr[-3000:])
    assert f"Resuming {run}" in result.stdout
    assert not (run / "partial").exists()  # done: the finished batches are folded into samples.npz
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_samples"] == 2 * len(shards) and metrics["devices"] == devices, (shards, metrics)
    run_sample(tmp_path / "whole", [*args[:-2], "trainer.devices=1", *NO_METRICS])  # uninterrupted, in one process
    _same_run(run, tmp_path / "whole", "devices")


def test_resume_with_another_batch_size_keeps_the_samples(trained, tmp_path, monkeypatch):
    _, run_dir = trained
    common = [f"ckpt={run_dir}", "sampler=ddim", "sampler.eta=1", "steps=3", "num_samples=7", *NO_METRICS]
    run = tmp_path / "run"
    interrupted_run(run, [*common, "batch_size=2"], 2, monkeypatch)
    assert len(list((run / "partial").glob("shard-*.npz"))) == 2
    result = run_sample(tmp_path / "log", [f"resume={run}", "batch_size=3"])
    assert result["resumed_samples"] == 3  # batch [0, 3) is taken from the shards [0, 2) and [2, 4); [3, 6) needs 4 and 5
    run_sample(tmp_path / "whole", [*common, "batch_size=7"])
    _same_run(run, tmp_path / "whole")


@pytest.mark.parametrize(
    "sampler,override,key",
    [
        (["sampler=ddim"], "seed=5", "seed"),
        (["sampler=ddim"], "steps=4", "steps"),
        (["sampler=ddim"], "sampler.spacing=uniform", "sampler.spacing"),
        (["sampler=ddim"], "sampler=ddpm", "sampler"),
        (["sampler=ddim"], "use_ema=false", "use_ema"),
        (["sampler=pc", "sampler.corrector=langevin"], "batch_size=3", "batch_size"),  # langevin adapts to the batch
    ],
)
def test_resume_refuses_settings_that_change_the_samples(trained, tmp_path, monkeypatch, sampler, override, key):
    _, run_dir = trained
    run = tmp_path / "run"
    interrupted_run(run, [f"ckpt={run_dir}", *sampler, "steps=3", "num_samples=4", "batch_size=2", *NO_METRICS], 1, monkeypatch)
    with pytest.raises(ConfigError, match=rf"resume: {key} is .* which changes the samples"):
        run_sample(tmp_path / "log", [f"resume={run}", override])
    assert len(list((run / "partial").glob("shard-*.npz"))) == 1  # nothing lost


def test_interrupted_run_is_not_reused_without_resume_and_a_finished_one_is_not_resumed(trained, tmp_path, monkeypatch):
    _, run_dir = trained
    common = [f"ckpt={run_dir}", "sampler=ddim", "steps=2", "num_samples=4", "batch_size=2", *NO_METRICS]
    run = tmp_path / "run"
    interrupted_run(run, common, 1, monkeypatch)
    with pytest.raises(ConfigError, match="unfinished samples of an interrupted run; continue it with resume="):
        run_sample(run, common)
    run_sample(tmp_path / "log", [f"resume={run}"])
    with pytest.raises(ConfigError, match="already complete"):
        run_sample(tmp_path / "log2", [f"resume={run}"])
    with pytest.raises(ConfigError, match="not a `diffctl sample` run directory"):
        run_sample(tmp_path / "log3", [f"resume={tmp_path / 'nothing'}"])
