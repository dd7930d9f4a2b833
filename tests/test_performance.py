"""The speed switches (compile, channels_last, sampling precision) keep results what they were, and
training reports its throughput. Their speed itself is measured in scripts/bench_*.py, not here."""

import json

import numpy as np
import torch
from helpers import run_cli, run_sample, run_train, tiny_overrides

from diffctl.build import load_denoiser
from diffctl.performance import sampling_autocast, speed_up
from diffctl.samplers import generate

ODE3 = ["sampler=ode", "steps=3", "num_samples=6", "batch_size=6", "metrics.names=[]"]


def _samples(out_dir):
    return np.load(out_dir / "samples.npz")["samples"].astype(np.int16)


def test_channels_last_sampling_gives_the_same_images(trained, tmp_path):
    _, run_dir = trained
    plain = run_sample(tmp_path / "plain", [f"ckpt={run_dir}", *ODE3, "channels_last=false"])
    nhwc = run_sample(tmp_path / "nhwc", [f"ckpt={run_dir}", *ODE3])  # default auto: on for CPU
    assert nhwc["channels_last"] is True and plain["channels_last"] is False
    # the same arithmetic in another memory order: at most a rounding step of uint8 apart
    assert np.abs(_samples(tmp_path / "plain") - _samples(tmp_path / "nhwc")).max() <= 1


def test_bf16_sampling_runs_the_network_in_bf16_and_stays_close(trained, tmp_path):
    _, run_dir = trained
    denoiser, _ = load_denoiser(run_dir, use_ema=True)
    dtypes = []
    first_conv = next(m for m in denoiser.net.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    exact = generate(denoiser, 6, (1, 8, 8), "ode", 3, seed=1)
    with sampling_autocast("bf16-mixed", torch.device("cpu")):
        reduced = generate(denoiser, 6, (1, 8, 8), "ode", 3, seed=1)
    assert dtypes[0] == torch.float32 and dtypes[-1] == torch.bfloat16
    assert reduced.dtype == torch.float32  # the sampler's state stays float32
    assert 0 < (reduced - exact).abs().max() < 0.1  # bf16 has 8 mantissa bits: close, not equal


def test_compiled_network_matches_eager(trained):
    _, run_dir = trained
    denoiser, _ = load_denoiser(run_dir, use_ema=True)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4) * 1000
    with torch.inference_mode():
        eager = denoiser.net(x, t)
        speed_up(denoiser.net, channels_last=True, compile=True)
        compiled = denoiser.net(x, t)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_compiled_training_writes_ordinary_checkpoints(trained, tmp_path):
    _, plain_dir = trained
    result = run_train(tmp_path / "run", [*tiny_overrides("unet"), "trainer.max_steps=2", "compile=true", "channels_last=true"])
    assert np.isfinite(result["loss"])
    load = lambda d: torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    compiled, plain = load(tmp_path / "run"), load(plain_dir)
    # same keys and shapes (no `_orig_mod.` prefix): samplable, exportable and resumable without compile
    assert {k: v.shape for k, v in compiled.items()} == {k: v.shape for k, v in plain.items()}


def test_training_reports_throughput_per_segment(tmp_path):
    run_dir = tmp_path / "run"
    first = run_train(run_dir, [*tiny_overrides("unet"), "trainer.max_steps=3"])
    run_train(run_dir, [*tiny_overrides("unet"), "trainer.max_steps=5", f"resume={run_dir}"])
    assert first["steady_images_per_s"] > 0 and first["images_per_s"] > 0
    records = json.loads((run_dir / "train_summary.json").read_text())
    assert [r["global_step"] for r in records] == [3, 5]  # the resumed segment adds, never replaces
    assert [r["steps_this_run"] for r in records] == [3, 2]


def test_unknown_sampling_precision_is_refused(tmp_path):
    out = run_cli(["sample", "model=gmm", "num_samples=2", "steps=2", "progress_bar=false", "precision=fp8"], tmp_path)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip() == "error: precision must be one of 32-true | 32 | bf16-mixed | 16-mixed, got 'fp8'"


def test_channels_last_auto_means_cpu_only_and_bad_values_are_refused(tmp_path):
    from diffctl.performance import use_channels_last

    assert use_channels_last("auto", "cpu") is True and use_channels_last("auto", "cuda") is False
    out = run_cli(["sample", "model=gmm", "num_samples=2", "steps=2", "progress_bar=false", "channels_last=maybe"], tmp_path)
    assert out.returncode == 1 and out.stderr.strip() == "error: channels_last must be true, false or auto, got 'maybe'", out.stderr
