"""The benchmark scripts run end to end at toy sizes and measure what their tables claim: equal NFE on
both sides, every switch row present, and the memory facts the switches exist for."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name):
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOY = ["--quick", "--resolution", "8", "--base-channels", "8"]


def test_bench_train_rows_and_memory_facts(tmp_path):
    report = _script("bench_train").main([*TOY, "--batch", "8", "--json", str(tmp_path / "t.json")])
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) >= {"raw loop", "lightning", "diffusers UNet2DModel (raw loop)", "lightning gradient checkpointing",
                         "lightning bf16-mixed", "lightning channels_last=false", "lightning optim.foreach=true"}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    # the reasons to turn the switches on: recomputation keeps fewer activations, bf16 halves them
    assert rows["lightning gradient checkpointing"]["activations_mib"] < 0.6 * rows["lightning"]["activations_mib"]
    assert rows["lightning bf16-mixed"]["activations_mib"] < 0.75 * rows["lightning"]["activations_mib"]
    # diffusers' U-Net is matched in size to ours
    assert math.isclose(rows["diffusers UNet2DModel (raw loop)"]["params_m"], rows["raw loop"]["params_m"], rel_tol=0.1)
    # the summary is the paired ratio of the rows, as written to the JSON
    assert rows["raw loop"]["vs_raw_loop"] == 1.0
    written = json.loads((tmp_path / "t.json").read_text())
    summary, interleaved = written["summary"], written["interleaved"]
    assert summary["lightning_overhead_pct_separate_runs"] == round(100 * (1 - rows["lightning"]["vs_raw_loop"]), 1)
    assert len(interleaved) == 1 and interleaved[0]["lightning_images_per_s"] > 0 and interleaved[0]["raw_images_per_s"] > 0
    assert summary["lightning_overhead_pct"] == round(100 * (1 - interleaved[0]["lightning_vs_raw"]), 1)


def test_interleaved_timing_gives_each_side_its_own_time():
    """Step-interleaved timing: a Lightning interval runs from the end of one raw step to the next
    batch end, so a 30 ms framework step and a 10 ms raw step come out as 30 and 10 ms."""
    import time

    bench = _script("bench_train")
    timer = bench.InterleavedRawSteps(lambda: time.sleep(0.010), torch.device("cpu"))
    for _ in range(6):
        time.sleep(0.030)  # the Lightning iteration
        timer.on_train_batch_end(None, None, None, None, 0)
    assert len(timer.lightning) == 5 and len(timer.raw) == 6
    assert all(0.029 < t < 0.045 for t in timer.lightning), timer.lightning
    assert all(0.009 < t < 0.025 for t in timer.raw), timer.raw


@pytest.mark.parametrize("size,paper_gflops", [("S", 6.06), ("B", 23.01), ("XL", 118.64)])
def test_flop_count_matches_the_dit_paper(size, paper_gflops):
    """The FLOPs behind MFU: DiT-{S,B,XL}/2 at 256x256 (32x32x4 latents), class-conditional, against
    Table 4 of Peebles & Xie (2023), whose Gflops are multiply-adds (attention included)."""
    sys.path.insert(0, str(SCRIPTS))
    from benchlib import count_flops

    from diffctl.networks import DiT

    net = DiT(in_channels=4, resolution=32, patch_size=2, size=size, num_classes=1000, out_channels=8).eval()
    x, t, y = torch.randn(1, 4, 32, 32), torch.rand(1), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        macs = count_flops(lambda: net(x, t, y)) / 2
    assert macs / 1e9 == pytest.approx(paper_gflops, rel=2e-3)


def test_bench_train_dit_reports_mfu(tmp_path):
    peak = 0.5  # TFLOP/s given by hand: CPUs have no entry in the peak table
    report = _script("bench_train").main([*TOY, "--batch", "4", "--model", "dit", "--dit-size", "tiny",
                                          "--peak-tflops", str(peak), "--json", str(tmp_path / "d.json")])
    rows = {r["variant"]: r for r in report["rows"]}
    assert "diffusers UNet2DModel (raw loop)" not in rows and "ours_vs_diffusers" not in report["summary"]
    for r in rows.values():  # model FLOPs of forward and backward (3x forward) per second, over the peak
        assert r["mfu_pct"] == pytest.approx(100 * 3 * r["gflops_per_image_fwd"] * 1e9 * r["images_per_s"] / (peak * 1e12), abs=0.01)
    best = max((r for r in rows.values() if r["variant"].startswith("lightning")), key=lambda r: r["mfu_pct"])
    assert report["summary"]["best_lightning_mfu_pct"] == best["mfu_pct"]


def test_bench_sample_compares_at_equal_nfe(tmp_path):
    report = _script("bench_sample").main([*TOY, "--batch", "4", "--json", str(tmp_path / "s.json")])
    by_sampler = {}
    for r in report["rows"]:
        assert r["images_per_s"] > 0
        by_sampler.setdefault(r["sampler"], set()).add(r["nfe"])
    assert by_sampler == {"DDIM": {5}, "DPM-Solver++(2M)": {5}, "DDPM": {5}}  # every row spent the same NFE
    assert {r["who"] for r in report["rows"] if r["sampler"] == "DDIM"} >= {
        "diffctl", "diffusers DDIMPipeline", "diffctl channels_last=false", "diffctl precision=bf16-mixed",
        "diffctl no_grad (not inference_mode)", "diffctl autograd left on"}


def test_bench_quality_scores_every_sampler(tmp_path, trained):
    from test_metrics import TinyNet

    _, run_dir = trained
    detector = tmp_path / "tiny.pt"
    torch.jit.script(TinyNet(0)).save(str(detector))
    common = ["--ckpt", str(run_dir), "--num", "8", "--batch", "8", "--ref-limit", "16", "--nfe", "4", "--ancestral-steps", "10",
              "--detector", "torchscript", "--detector-path", str(detector), "--cache-dir", str(tmp_path / "cache")]
    bench = _script("bench_quality")
    first = bench.main([*common, "--samplers", "ancestral,ddim", "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")])
    assert [r["sampler"] for r in first["rows"]] == ["ancestral 10", "ddim"]
    # --extend keeps the rows measured before (the expensive reference too) and adds the rest
    report = bench.main([*common, "--extend", str(tmp_path / "a.json"), "--json", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png")])
    assert report["rows"][:2] == first["rows"]
    nfe = {r["sampler"]: r["nfe"] for r in report["rows"]}
    assert nfe["ancestral 10"] == 10 and nfe["ddpm"] == nfe["ddim"] == nfe["pc"] == nfe["ode dpmpp_2m"] == 4
    assert nfe["ode heun"] == 3 and len(report["rows"]) == 7
    assert nfe["ode adaptive"] >= 2
    assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 for r in report["rows"])
    assert report["rows"][0]["fid_vs_ancestral"] == pytest.approx(1.0)
    assert (tmp_path / "q.png").stat().st_size > 0


def test_bench_img2img_rows_and_the_bicubic_baseline(tmp_path):
    """Toy sizes, both tasks: every row present with finite metrics, and the bicubic row's PSNR equal to
    PIL's bicubic (antialiased down by 2, up by 2) of the test images, scored with numpy."""
    from PIL import Image

    import gzip

    # its own cache: the reference features it caches are not shared with tests running at the same time
    report = _script("bench_img2img").main(["--quick", "--work", str(tmp_path / "w"), "--json", str(tmp_path / "i.json"),
                                            "--plot", str(tmp_path / "i.png"), "--cache-dir", str(tmp_path / "cache")])
    rows = {(r["task"], r["row"]): r for r in report["rows"]}
    assert set(rows) == {("sr", "bicubic upsampling"), ("sr", "regressor (1 step)"), ("sr", "diffusion (DDIM 2)"),
                         ("colorize", "gray as RGB"), ("colorize", "regressor (1 step)"), ("colorize", "diffusion (DDIM 2)")}
    for r in rows.values():
        for key in ("psnr", "ssim", "fid", "kid"):
            assert math.isfinite(r[key]), (r["row"], key)
        assert r["lpips"] is None  # no --lpips weights given
    assert rows[("sr", "regressor (1 step)")]["nfe"] == 1 and rows[("sr", "diffusion (DDIM 2)")]["nfe"] == 2
    assert all(math.isfinite(rows[("sr", k)]["consistency"]) for k in ("bicubic upsampling", "regressor (1 step)"))
    with gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz") as f:  # the IDX file itself
        targets = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:8]
    psnrs = []
    for img in targets:
        pil = Image.fromarray(img)
        up = np.asarray(pil.resize((14, 14), Image.BICUBIC).resize((28, 28), Image.BICUBIC), dtype=np.float64)
        mse = ((up - img.astype(np.float64)) ** 2).mean()
        psnrs.append(10 * np.log10(255.0**2 / mse))
    # PIL rounds to uint8 between the two resizes, torch does not: a fraction of a dB at most
    assert rows[("sr", "bicubic upsampling")]["psnr"] == pytest.approx(float(np.mean(psnrs)), abs=0.3)
    assert (tmp_path / "i.png").stat().st_size > 0
