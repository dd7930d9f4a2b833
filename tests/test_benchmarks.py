"""The benchmark scripts run end to end at toy sizes and measure what their tables claim: equal NFE on
both sides, every switch row present, and the memory facts the switches exist for."""

import importlib.util
import json
import math
import sys
from pathlib import Path

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
    summary = json.loads((tmp_path / "t.json").read_text())["summary"]
    assert summary["lightning_overhead_pct"] == round(100 * (1 - rows["lightning"]["vs_raw_loop"]), 1)


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
