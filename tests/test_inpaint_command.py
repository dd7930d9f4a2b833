"""`diffctl inpaint` on the tiny U-Net checkpoint of 8x8 digits: its outputs, independence of the
batch size and number of processes, resume, the NFE against RePaint's schedule, and bad inputs."""

import json

import numpy as np
import pytest
from helpers import compose_train, run_cli

from diffctl.errors import ConfigError
from diffctl.image_sources import read_images
from diffctl.images import to_uint8
from diffctl.inpaint import jump_schedule
from diffctl.masks import parse_masks

FAST = ["steps=4", "jump_length=2", "resample=2", "trainer.accelerator=cpu"]


def run_inpaint(out_dir, overrides):
    """`diffctl inpaint <overrides>` in this process, writing to out_dir."""
    from diffctl.inpaint_command import inpaint_command

    return inpaint_command(compose_train(out_dir, ["progress_bar=false", *overrides], config_name="inpaint"))


def _load(out):
    with np.load(out / "inpainted.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((out / "metrics.json").read_text())


def test_writes_the_outputs_and_keeps_the_known_pixels_exactly(trained, tmp_path):
    _, run_dir = trained
    run_inpaint(tmp_path, [f"ckpt={run_dir}", *FAST, "limit=5", "batch_size=2", "mask=random", "seed=3"])
    arrays, metrics = _load(tmp_path)
    original = to_uint8(read_images("digits:test", limit=5).images).numpy()
    known = parse_masks("random", 8, 8, 5).get(range(5), 3)[:, 0].numpy().astype(np.uint8)
    assert arrays["samples"].shape == (5, 8, 8, 1) and arrays["samples"].dtype == np.uint8
    np.testing.assert_array_equal(arrays["masks"], known)  # per image (random masks differ between images)
    assert len({m.tobytes() for m in known}) > 1
    keep = known[..., None].astype(bool).repeat(1, -1)
    np.testing.assert_array_equal(arrays["samples"][keep], original[keep])  # the known region bit for bit
    assert not np.array_equal(arrays["samples"][~keep], original[~keep])  # the hole is the model's
    np.testing.assert_array_equal(arrays["labels"], read_images("digits:test", limit=5).labels.numpy())
    assert (tmp_path / "inpaint_grid.png").is_file() and not (tmp_path / "partial").exists()
    assert metrics["num_images"] == 5 and metrics["method"] == "repaint" and metrics["steps"] == 4
    assert np.isfinite(metrics["psnr_masked"]) and -1 <= metrics["ssim_masked"] <= 1
    for key in ("nfe_per_sample", "time_s", "images_per_s", "jump_length", "resample"):
        assert key in metrics


def _psnr_of_unknown(samples, original, known):
    """Masked PSNR from the saved uint8 files, written out independently of inpaint_report."""
    a = samples.astype(np.float64) / 127.5 - 1
    b = original.astype(np.float64) / 127.5 - 1
    w = (known == 0)[..., None].astype(np.float64)
    mse = ((a - b) ** 2 * w).reshape(len(a), -1).sum(1) / w.reshape(len(a), -1).sum(1)
    return float(np.mean(10 * np.log10(4 / mse)))


def test_metrics_are_the_masked_psnr_of_the_saved_images(trained, tmp_path):
    _, run_dir = trained
    run_inpaint(tmp_path, [f"ckpt={run_dir}", *FAST, "limit=3", "mask=center"])
    arrays, metrics = _load(tmp_path)
    original = to_uint8(read_images("digits:test", limit=3).images).numpy()
    # the originals are dataset floats; the uint8 round trip changes them by < 1/255: a loose tolerance
    assert metrics["psnr_masked"] == pytest.approx(_psnr_of_unknown(arrays["samples"], original, arrays["masks"]), abs=0.05)


@pytest.mark.parametrize("method,resample", [("repaint", 3), ("replace", 1)])
def test_nfe_is_repaints_schedule(trained, tmp_path, method, resample):
    _, run_dir = trained
    run_inpaint(tmp_path, [f"ckpt={run_dir}", "steps=6", "jump_length=2", "resample=3", f"method={method}",
                           "limit=2", "trainer.accelerator=cpu"])  # fmt: skip
    _, metrics = _load(tmp_path)
    path = jump_schedule(6, 2, resample)
    downs = sum(1 for a, b in zip(path, path[1:]) if b > a)  # counted here: a call before every step down, one at the end
    # RePaint's published count for T steps, jump j, r resamples: T + (r - 1) j ceil((T - j) / j)
    assert metrics["nfe_per_sample"] == downs + 1 == 6 + (resample - 1) * 2 * 2
    assert metrics["resample"] == resample


def test_same_output_whatever_the_batch_size_and_number_of_processes(trained, tmp_path):
    _, run_dir = trained
    common = [f"ckpt={run_dir}", *FAST, "limit=5", "seed=4", "mask=random"]
    run_inpaint(tmp_path / "a", [*common, "batch_size=5"])
    run_inpaint(tmp_path / "b", [*common, "batch_size=2", "trainer.devices=2"])
    run_inpaint(tmp_path / "c", [*common, "batch_size=5", "seed=5"])
    a, b, c = (_load(tmp_path / d) for d in "abc")
    np.testing.assert_array_equal(a[0]["samples"], b[0]["samples"])
    np.testing.assert_array_equal(a[0]["masks"], b[0]["masks"])
    assert not np.array_equal(a[0]["samples"], c[0]["samples"])
    assert b[1]["devices"] == 2 and a[1]["psnr_masked"] == b[1]["psnr_masked"]


def _interrupted_run(run, overrides, after_batches, monkeypatch):
    """A run dir as `diffctl inpaint` leaves it when stopped after `after_batches` batches."""
    from omegaconf import OmegaConf

    import diffctl.inpaint_command as command
    import diffctl.inpaint_job as job

    cfg = compose_train(run, ["progress_bar=false", *overrides], config_name="inpaint")
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    real, count = job.inpaint, [0]

    def inpaint(*a, **k):
        if count[0] == after_batches:
            raise KeyboardInterrupt
        count[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(job, "inpaint", inpaint)
    with pytest.raises(KeyboardInterrupt):
        command.inpaint_command(cfg)
    monkeypatch.setattr(job, "inpaint", real)


def test_resume_gives_the_uninterrupted_output(trained, tmp_path, monkeypatch):
    _, run_dir = trained
    common = [f"ckpt={run_dir}", *FAST, "limit=5", "mask=random", "seed=2"]
    run = tmp_path / "run"
    _interrupted_run(run, [*common, "batch_size=2"], 1, monkeypatch)
    assert len(list((run / "partial").glob("shard-*.npz"))) == 1
    with pytest.raises(ConfigError, match="unfinished .* of an interrupted run; continue it with resume="):
        run_inpaint(run, common)
    with pytest.raises(ConfigError, match="resume: seed is 2 .* which changes the samples"):
        run_inpaint(tmp_path / "log2", [f"resume={run}", "seed=9"])
    result = run_inpaint(tmp_path / "log", [f"resume={run}", "batch_size=1"])
    assert result["resumed_images"] == 2  # images 0 and 1 come from the shard [0, 2), one batch each
    run_inpaint(tmp_path / "whole", [*common, "batch_size=5"])
    (resumed, _), (whole, _) = _load(run), _load(tmp_path / "whole")
    for key in ("samples", "masks", "labels"):
        np.testing.assert_array_equal(resumed[key], whole[key])
    assert not (run / "partial").exists()


def _npz_16x16(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, samples=np.zeros((2, 16, 16, 1), dtype=np.uint8))
    return path


@pytest.mark.parametrize(
    "override,message",
    [
        ("method=paint", r"method must be one of repaint, replace, got 'paint'"),
        ("mask='box:0,0,9,4'", r"mask=box:0,0,9,4 is not a box inside the 8x8 images"),
        ("mask=blob", r"unknown mask='blob'"),
        ("images=BIG", r"has 16x16 images, 8x8 are needed"),
        ("class_label=3", r"class_label=3, but .* is unconditional"),
        ("jump_length=4", r"jump_length=4 must be below steps=4"),
    ],
)
def test_bad_inputs_are_one_line_errors_before_any_work(trained, tmp_path, override, message):
    _, run_dir = trained
    override = override.replace("BIG", str(_npz_16x16(tmp_path)))
    with pytest.raises(ConfigError, match=message) as err:
        run_inpaint(tmp_path / "out", [f"ckpt={run_dir}", *FAST, "limit=2", override])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "partial").exists()  # nothing started


def test_the_cli_runs_it_and_reports_bad_input_in_one_line(trained, tmp_path):
    root, run_dir = trained
    bad = run_cli(["inpaint", f"ckpt={run_dir}", "method=paint"], cwd=root)
    assert bad.returncode == 1 and "method must be one of repaint, replace" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout
    good = run_cli(["inpaint", *FAST, "limit=2", "progress_bar=false", f"hydra.run.dir={tmp_path / 'cli'}"], cwd=root)
    assert good.returncode == 0, good.stderr[-2000:]
    assert "diffctl inpaint" in good.stdout and (tmp_path / "cli" / "inpainted.npz").is_file()
    assert "inpaint " in run_cli(["--help"], cwd=root).stdout


def test_a_consistency_model_is_refused_before_any_work(trained, tmp_path):
    """A one-step model as the source (the trained network with one_step capabilities: training a
    consistency model here would cost more than the rest of this file)."""
    import dataclasses
    from types import SimpleNamespace

    from diffctl.build import resolve_weights
    from diffctl.inpaint_job import prepare
    from diffctl.source import load_source

    _, run_dir = trained
    cfg = compose_train(tmp_path, [f"ckpt={run_dir}", *FAST, "limit=2"], config_name="inpaint")
    source = load_source(cfg, str(resolve_weights(run_dir)))
    assert len(prepare(cfg, source)) == 2  # the diffusion model itself is accepted
    one_step = SimpleNamespace(capabilities=dataclasses.replace(source.denoiser.capabilities, one_step=True))
    with pytest.raises(ConfigError, match="is a consistency model .*inpainting needs a diffusion model"):
        prepare(cfg, dataclasses.replace(source, denoiser=one_step))


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    from helpers import run_train, tiny_overrides

    run_dir = tmp_path_factory.mktemp("cond") / "run"
    run_train(run_dir, [*tiny_overrides("unet"), "trainer.max_steps=2", "conditional=true", "label_dropout=0.2"])
    return run_dir


def _conds(monkeypatch):
    """The class labels every batch is inpainted with, by first index."""
    import diffctl.inpaint_job as job

    real, seen = job.inpaint, {}

    def inpaint(model, known, mask, steps, method, seed, first, cond, *a, **k):
        seen[first] = cond["class_label"].cpu().tolist()
        return real(model, known, mask, steps, method, seed, first, cond, *a, **k)

    monkeypatch.setattr(job, "inpaint", inpaint)
    return seen


@pytest.mark.parametrize("images,class_label", [("digits:test", None), ("digits:test", 3), ("NOLABELS", None)])
def test_a_conditional_model_gets_the_images_own_labels(conditional, tmp_path, monkeypatch, images, class_label):
    seen = _conds(monkeypatch)
    path = tmp_path / "nolabels.npz"
    np.savez(path, samples=to_uint8(read_images("digits:test", limit=12).images).numpy())
    run_inpaint(tmp_path / "out", [f"ckpt={conditional}", *FAST, "limit=12", "batch_size=5",
                                   f"images={str(path) if images == 'NOLABELS' else images}", f"class_label={'null' if class_label is None else class_label}"])  # fmt: skip
    got = [label for first in sorted(seen) for label in seen[first]]
    if class_label is not None:
        assert got == [3] * 12
    elif images == "NOLABELS":  # no labels to take: image i gets class i mod 10, as in `diffctl sample`
        assert got == [i % 10 for i in range(12)]
    else:
        assert got == read_images("digits:test", limit=12).labels.tolist() != [i % 10 for i in range(12)]
