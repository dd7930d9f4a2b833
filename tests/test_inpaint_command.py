"""`diffctl inpaint` on the tiny U-Net checkpoint of 8x8 digits: its outputs, independence of the
batch size and number of processes, resume, the NFE against RePaint's schedule, and bad inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_train, interrupted_run, run_cli

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


def test_resume_gives_the_uninterrupted_output(trained, tmp_path, monkeypatch):
    _, run_dir = trained
    common = [f"ckpt={run_dir}", *FAST, "limit=5", "mask=random", "seed=2"]
    run = tmp_path / "run"
    interrupted_run(run, [*common, "batch_size=2"], 1, monkeypatch, "inpaint")
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
        ("precision=fp8", r"precision must be one of 32-true \| 32 \| bf16-mixed \| 16-mixed, got 'fp8'"),
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


# --- what `diffctl sample` offers: memory check, precision, compile, sweeps ------------------------


def test_a_batch_that_cannot_fit_is_refused_in_one_line_before_any_output(trained, tmp_path, monkeypatch):
    """sample's memory check (diffctl.memory) on a faked small budget, as tests/test_bad_inputs_signals.py
    fakes a large one; the batch it says fits then runs under the same budget."""
    import diffctl.memory as memory
    from diffctl.rundir import used_files

    _, run_dir = trained
    monkeypatch.setattr(memory, "available", lambda device: (256 * 2**10, "free in this test"))
    common = [f"ckpt={run_dir}", *FAST, "limit=16"]
    with pytest.raises(memory.MemoryRefused) as err:
        run_inpaint(tmp_path / "big", [*common, "batch_size=1000000"])
    line = str(err.value)
    assert "\n" not in line and line.startswith("inpainting with batch_size=16 needs about")  # a batch is at most the 16 images
    assert "network activations" in line and "0.25 MiB free in this test" in line and "memory_check=false skips" in line
    assert used_files(tmp_path / "big") == []  # nothing written, not even partial/manifest.json (only the run's lock)
    fits = int(line.split("at most batch_size=")[1].split()[0])
    assert 1 <= fits < 16
    run_inpaint(tmp_path / "fits", [*common, f"batch_size={fits}"])  # what it says fits is not refused
    run_inpaint(tmp_path / "off", [*common, "batch_size=16", "memory_check=false"])  # and the check can be skipped
    assert (tmp_path / "fits" / "inpainted.npz").is_file() and (tmp_path / "off" / "inpainted.npz").is_file()


def test_bf16_changes_the_inpainted_region_slightly_and_keeps_the_known_pixels(tmp_path, monkeypatch):
    """On the golden tests' 40-step network (tests/golden/tiny.safetensors, an export): the 2-step one's
    outputs are ~1e-3, too small for bf16's rounding to reach a uint8 level."""
    import torch

    common = [f"ckpt={Path(__file__).parent / 'golden' / 'tiny.safetensors'}", *FAST, "limit=8", "mask=center"]
    convs = []  # the dtype the network's convolutions compute in
    real_conv = torch.nn.Conv2d._conv_forward

    def conv(self, x, weight, bias):
        out = real_conv(self, x, weight, bias)
        convs.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", conv)
    run_inpaint(tmp_path / "fp32", common)
    assert set(convs) == {torch.float32}
    convs.clear()
    run_inpaint(tmp_path / "bf16", [*common, "precision=bf16-mixed"])
    assert torch.bfloat16 in convs
    (fp32, m32), (bf16, m16) = _load(tmp_path / "fp32"), _load(tmp_path / "bf16")
    assert (m32["precision"], m16["precision"]) == ("32-true", "bf16-mixed") and m16["compile"] is False
    original = to_uint8(read_images("digits:test", limit=8).images).numpy()
    keep = fp32["masks"][..., None].astype(bool)
    for arrays in (fp32, bf16):
        np.testing.assert_array_equal(arrays["samples"][keep], original[keep])  # bit for bit, whatever the precision
    diff = np.abs(fp32["samples"].astype(int) - bf16["samples"].astype(int))[~keep]
    assert 0 < diff.max() <= 2, diff.max()  # bf16 has 8 mantissa bits: close (measured: 1 level), not equal


def test_compile_is_passed_to_the_network_and_recorded(trained, tmp_path, monkeypatch):
    """The config path only: torch.compile itself is tested against eager in tests/test_performance.py
    (compiling here would cost more than this file's other tests)."""
    import torch

    _, run_dir = trained
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    result = run_inpaint(tmp_path, [f"ckpt={run_dir}", *FAST, "limit=2", "compile=true"])
    assert compiled == ["UNet"] and result["compile"] is True and _load(tmp_path)[1]["compile"] is True


def test_resume_refuses_another_precision(trained, tmp_path, monkeypatch):
    _, run_dir = trained
    run = tmp_path / "run"
    interrupted_run(run, [f"ckpt={run_dir}", *FAST, "limit=4", "batch_size=2"], 1, monkeypatch, "inpaint")
    with pytest.raises(ConfigError, match=r"resume: precision is '32-true' in .* but 'bf16-mixed' here, which changes") as err:
        run_inpaint(tmp_path / "log", [f"resume={run}", "precision=bf16-mixed"])
    assert "\n" not in str(err.value) and len(list((run / "partial").glob("shard-*.npz"))) == 1


def test_multirun_writes_one_summary_with_a_row_per_job(trained, tmp_path):
    root, run_dir = trained
    sweep = tmp_path / "sweep"
    out = run_cli(["inpaint", "--multirun", f"ckpt={run_dir}", "method=repaint,replace", *FAST, "limit=2",
                   "progress_bar=false", f"hydra.sweep.dir={sweep}"], cwd=root)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((sweep / "summary.json").read_text())
    assert [(r["method"], r["resample"]) for r in rows] == [("repaint", 2), ("replace", 1)]
    for job, row in enumerate(rows):  # the jobs' own metrics, gathered
        assert row == json.loads((sweep / str(job) / "metrics.json").read_text())
    assert rows[0]["nfe_per_sample"] > rows[1]["nfe_per_sample"] == 4  # replace: one call per level
    assert out.stdout.count("diffctl inpaint sweep (2 jobs)") == 1
    table = out.stdout[out.stdout.index("diffctl inpaint sweep (2 jobs)"):]
    header = table.splitlines()[2]
    names = ("method", "steps", "jump_length", "resample", "nfe_per_sample", "psnr_masked", "ssim_masked", "time_s")
    # the columns in this order; rich may wrap a long name over two lines, so the first letters
    assert [header.index(n[:4]) for n in names] == sorted(header.index(n[:4]) for n in names), header
    assert "images_per_s" not in table and "repaint" in table and "replace" in table
    assert f"summary: {sweep / 'summary.json'}" in out.stdout.replace("\n", "")
