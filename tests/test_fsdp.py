"""trainer.strategy=fsdp on CPU (gloo): 2 sharded processes against 1 process on the same global
batch, EMA, exact resume, sample grids, and the checkpoint read by `diffctl sample`/`export`."""

import socket

import numpy as np
import pytest
import torch
from helpers import (
    compose_train,
    load_ckpt,
    run_cli,
    run_sample,
    run_train,
    subtree,
    tiny_overrides,
)
from PIL import Image

from diffctl.errors import ConfigError

STEPS = 4
COMMON = [*tiny_overrides("dit"), f"trainer.max_steps={STEPS}", "optim.warmup_steps=0", "optim.lr=1e-3",
          "checkpoint.every_n_steps=2", "trainer.gradient_clip_val=0.05"]  # clipping active: the FSDP norm is over all shards
FSDP = ["trainer=fsdp_cpu", "data.batch_size=8"]  # 2 gloo processes x 8 = the single process's batch of 16
NO_METRICS = ["metrics.names=[]"]


def _free_port() -> str:
    with socket.socket() as s:  # tests run in parallel (pytest-xdist): never a fixed port
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _fsdp(args, tmp_path):
    out = run_cli(["train", *COMMON, *FSDP, *args], tmp_path, env={"MASTER_PORT": _free_port()})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process run, 2-process FSDP run, FSDP run resumed from the other's step-2 checkpoint)."""
    root = tmp_path_factory.mktemp("fsdp")
    single, sharded, resumed = root / "single", root / "sharded", root / "resumed"
    run_train(single, [*COMMON, "data.batch_size=16", "channels_last=false"])  # the layout FSDP keeps (NCHW)
    _fsdp([f"hydra.run.dir={sharded}", "sample_grid.every_n_steps=2"], root)
    _fsdp([f"hydra.run.dir={resumed}", f"resume={sharded / 'checkpoints' / 'step_0000002.ckpt'}"], root)
    return single, sharded, resumed


def _state(run, name="last.ckpt"):
    return load_ckpt(run / "checkpoints" / name)["state_dict"]  # torch.load(weights_only=True)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_on_the_same_global_batch(runs):
    single, sharded, _ = runs
    a, b = _state(single), _state(sharded)
    # Same consolidated file: the same keys and shapes as a single-device checkpoint.
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    moved = max(float((a[k] - a["ema." + k[len("denoiser."):]]).abs().max()) for k in a if k.startswith("denoiser."))
    assert moved > 0
    # Gradients are reduce-scattered in another summation order: equal up to float rounding (measured
    # 1.5e-8 at most; the gradient clipped by one shard's norm instead of the global one is 1.9e-5 off).
    for prefix in ("denoiser.", "ema."):
        wa, wb = subtree(a, prefix), subtree(b, prefix)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    # Only rank 0 writes: one run directory with one set of checkpoints and grids.
    assert sorted(p.name for p in (sharded / "checkpoints").iterdir()) == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    assert sorted(p.name for p in (sharded / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    # The grid is sampled from the sharded EMA weights: the single process's grid, to an 8-bit level.
    grids = [np.asarray(Image.open(run / "samples" / "step_0000004.png")).astype(int) for run in (single, sharded)]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 1


@pytest.mark.slow
def test_fsdp_resume_equals_the_uninterrupted_run(runs):
    _, sharded, resumed = runs
    whole, cont = load_ckpt(sharded / "checkpoints" / "last.ckpt"), load_ckpt(resumed / "checkpoints" / "last.ckpt")
    assert whole["global_step"] == cont["global_step"] == STEPS
    for k, v in whole["state_dict"].items():
        assert torch.equal(cont["state_dict"][k], v), k
    # The Adam moments went through the sharded save and load too.
    states = [ckpt["optimizer_states"][0]["state"] for ckpt in (whole, cont)]
    assert states[0].keys() == states[1].keys() and states[0]
    for name in states[0]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(states[1][name][key], states[0][name][key]), (name, key)


@pytest.mark.slow
def test_fsdp_checkpoint_samples_and_exports_like_any_other(runs, tmp_path):
    from diffctl.build import load_export

    single, sharded, _ = runs
    common = ["sampler=ddim", "steps=3", "num_samples=4", "batch_size=4", "trainer.accelerator=cpu", *NO_METRICS]
    run_sample(tmp_path / "single", [f"ckpt={single}", *common])
    run_sample(tmp_path / "sharded", [f"ckpt={sharded}", *common])
    a, b = (np.load(tmp_path / d / "samples.npz")["samples"].astype(int) for d in ("single", "sharded"))
    assert a.shape == (4, 8, 8, 1) and np.abs(a - b).max() <= 1  # weights equal to 1e-5: at most one 8-bit level apart
    from diffctl.export import export

    export(compose_train(tmp_path / "export", [f"ckpt={sharded}", f"out={tmp_path / 'export' / 'model.safetensors'}"], "export"))
    denoiser, _, weights = load_export(tmp_path / "export" / "model.safetensors")
    assert weights == "ema"
    ema = subtree(_state(sharded), "ema.")
    for k, v in denoiser.state_dict().items():
        assert torch.equal(v, ema[k]), k


@pytest.mark.parametrize("overrides, key", [
    (["compile=true"], "compile=true"),
    (["channels_last=true"], "channels_last=true"),
    (["objective=consistency", "objective.teacher=teacher.ckpt"], "objective.teacher"),  # refused before it is read
])
def test_fsdp_refuses_what_it_cannot_shard_in_one_line(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key} .*trainer.strategy=fsdp") as err:
        run_train(tmp_path / "run", [*COMMON, "trainer=fsdp_cpu", *overrides])
    assert "\n" not in str(err.value)


def test_fsdp_cpu_offload_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.strategy=fsdp_cpu_offload is not supported") as err:
        run_train(tmp_path / "run", [*COMMON, "trainer.strategy=fsdp_cpu_offload"])
    assert "\n" not in str(err.value)


def test_bench_memory_counts_the_units_fsdp_makes(tmp_path):
    """scripts/bench_memory.py's per-unit counts against the flat parameters FSDP itself builds with
    diffctl's wrap rule (one process group of 1), and its DiT sizes against the DiT paper."""
    import importlib.util
    import sys
    from pathlib import Path

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from diffctl.denoiser import compose
    from diffctl.networks import DiT
    from diffctl.sde import VPSDE
    from diffctl.sharding import block_classes

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    spec = importlib.util.spec_from_file_location("bench_memory", scripts / "bench_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    net = DiT(in_channels=1, resolution=8, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=10)
    counted = sorted(bench.fsdp_units(net))  # before FSDP replaces the parameters by flat ones
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        # As in training: the root (the LightningModule there) owns no parameters, the Denoiser is a unit.
        root = torch.nn.ModuleDict({"denoiser": compose(net, VPSDE())})
        wrapped = FullyShardedDataParallel(root, auto_wrap_policy=ModuleWrapPolicy(block_classes()),
                                           use_orig_params=False, device_id=torch.device("cpu"))
        flat = sorted(p.numel() for p in wrapped.parameters())  # one flat parameter per unit, unpadded at N=1
    finally:
        dist.destroy_process_group()
    assert counted == flat and len(flat) == 3 + 1  # a unit per block and the rest

    report = bench.main(["--quick", "--out", str(tmp_path / "m.json")])
    assert round(report["params"] / 1e6) == 33  # DiT-S/2: 33 M parameters (Peebles & Xie 2023, Table 4)
    rows = {(r["strategy"], r["world_size"]): r for r in report["rows"]}
    assert rows["fsdp", 1]["total_mib"] == rows["ddp", 1]["total_mib"] == rows["ddp", 8]["total_mib"]
    assert rows["fsdp", 8]["model_state_mib"] == pytest.approx(rows["ddp", 1]["model_state_mib"] / 8, rel=1e-3)
    assert rows["fsdp", 2]["activations_mib"] == rows["ddp", 2]["activations_mib"] > 0


@pytest.mark.slow
def test_resume_across_fsdp_and_other_strategies_is_one_line(runs, tmp_path):
    single, sharded, _ = runs
    for source, trainer, said in ((sharded, "trainer=cpu", "was trained with trainer.strategy=fsdp"),
                                  (single, "trainer=fsdp_cpu", "was trained without FSDP")):
        with pytest.raises(ConfigError, match=rf"^resume=.* {said}, .*resume with") as err:
            run_train(tmp_path / source.name, [*COMMON, trainer, f"resume={source}", "trainer.max_steps=6"])
        assert "\n" not in str(err.value)
