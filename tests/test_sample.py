"""`diffctl sample` from checkpoints made by `diffctl train` (real CLI in subprocesses)."""

import json

import numpy as np
import pytest
from helpers import run_cli, run_train, tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    run_dir = root / "outputs" / "train" / "run"
    run_train(run_dir, [*tiny_overrides("unet"), "trainer.max_steps=2"])
    return root, run_dir


def _sample(cwd, out, *args):
    result = run_cli(["sample", *args, f"hydra.run.dir={out}", "progress_bar=false"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out / "samples.npz")["samples"], json.loads((out / "metrics.json").read_text()), result


@pytest.mark.parametrize("sampler,steps,nfe", [("ode", 3, 7), ("pc", 4, 5)])
def test_sample_writes_npz_grid_and_metrics(trained, tmp_path, sampler, steps, nfe):
    root, run_dir = trained
    samples, metrics, _ = _sample(root, tmp_path, f"ckpt={run_dir}", f"sampler={sampler}", f"steps={steps}", "num_samples=5", "batch_size=2")
    assert samples.shape == (5, 8, 8, 1) and samples.dtype == np.uint8
    assert (tmp_path / "samples.png").is_file()
    assert metrics["nfe_per_sample"] == nfe  # Heun: 2 per step; EM: 1 per step; +1 final denoising
    assert metrics["num_samples"] == 5 and metrics["weights"] == "ema"


def test_same_seed_gives_same_images_whatever_the_batch_size(trained, tmp_path):
    root, run_dir = trained
    a, _, _ = _sample(root, tmp_path / "a", f"ckpt={run_dir}", "sampler=pc", "steps=3", "num_samples=6", "batch_size=4", "seed=3")
    b, _, _ = _sample(root, tmp_path / "b", f"ckpt={run_dir}", "sampler=pc", "steps=3", "num_samples=6", "batch_size=6", "seed=3")
    c, _, _ = _sample(root, tmp_path / "c", f"ckpt={run_dir}", "sampler=pc", "steps=3", "num_samples=6", "batch_size=6", "seed=4")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({s.tobytes() for s in a}) == 6  # no duplicated samples


def test_without_ckpt_uses_newest_checkpoint_under_outputs(trained, tmp_path):
    root, run_dir = trained
    _, metrics, result = _sample(root, tmp_path, "steps=2", "num_samples=2")
    assert "Using the newest checkpoint" in result.stdout and str(run_dir) in metrics["checkpoint"]


def test_consistency_sampler_needs_a_consistency_checkpoint(trained, tmp_path):
    root, run_dir = trained
    result = run_cli(["sample", f"ckpt={run_dir}", "sampler=consistency", f"hydra.run.dir={tmp_path}"], root)
    assert result.returncode == 1 and "sampler=consistency" in result.stderr and "Traceback" not in result.stderr


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_cli(["sample", f"ckpt={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 1 and "checkpoint not found" in result.stderr and "Traceback" not in result.stderr
