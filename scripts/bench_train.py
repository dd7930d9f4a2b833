#!/usr/bin/env python
"""Training throughput: diffctl's Lightning path against a hand-written PyTorch loop (the floor) and
against diffusers' UNet2DModel of matched size in the same loop, plus each speed switch on/off.

    python scripts/bench_train.py                      # about 9 minutes on 2 CPU cores (--repeats 5: 15)
    python scripts/bench_train.py --quick              # fewer steps/repeats, no compile: a smoke run
    python scripts/bench_train.py --resolution 32 --batch 64 --base-channels 64 --steps 40
    python scripts/bench_train.py --model dit --dit-size B --resolution 32 --batch 256 --steps 50   # GPU: DiT-B/2 MFU

Every row trains the same network (diffctl's U-Net, or with --model dit a DiT, built from the same
config) on the same batches:
- `lightning ...`: `diffctl.train.train` exactly as `diffctl train` runs it (csv logger, EMA, grad
  clipping at 1.0, warm-up LR schedule, atomic checkpoint at the end), in this process;
- `raw loop`: the same maths written out by hand: t ~ U(eps, 1), VP noising, input scaling, eps-MSE,
  backward, clip_grad_norm_(1.0), Adam, LR scheduler, foreach EMA update, with the memory layout and
  Adam kernels `diffctl train` uses by default (channels_last=auto, optim.foreach=null). Nothing else.
- `diffusers UNet2DModel`: diffusers' U-Net with the same widths, depth, attention level and heads in
  the same raw loop, same layout (its parameter count and FLOPs are printed next to ours).
- `lightning <switch>=<value>`: one switch flipped from its default (16-mixed and compiled bf16: GPU only).
Throughput is images/s from the median step time after the first tenth of the steps (compilation and
allocator warm-up excluded), the median over --repeats runs, the variants interleaved within each
repeat so drifts in machine load hit them alike.
Lightning overhead (1 - lightning / raw loop) comes from a run in which a raw-loop step follows every
Lightning step (`InterleavedRawSteps`): both sides see the same machine within a fraction of a second,
whereas separate runs drift apart by up to 30% here. The separate-run ratio is printed beside it.
MFU: model FLOPs (forward by torch's flop counter, backward as 2x forward) per second over the bf16
dense peak of a known GPU or --peak-tflops.
Memory: on CUDA the peak allocated during the run; everywhere, the activations autograd keeps for
backward in one forward at this batch (what gradient checkpointing trades for recomputation).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    add_common_args,
    count_flops,
    environment,
    peak_tflops,
    saved_activation_bytes,
    steady_rate,
    write_json,
)

import diffctl  # noqa: E402,F401  (torchvision shim first)
import lightning as L  # noqa: E402
from diffctl.config import compose_config  # noqa: E402
from diffctl.performance import speed_up, use_channels_last  # noqa: E402


def overrides(args, extra: list[str]) -> list[str]:
    if args.model == "dit":
        model = ["model=dit", f"model.patch_size={args.patch_size}"]
        model += [f"model.size={args.dit_size}"] if args.dit_size != "tiny" else []  # tiny: conf/model/dit.yaml
    else:
        model = [
            "model=unet",
            f"model.base_channels={args.base_channels}",
            "model.channel_mult=[1,2,2]",
            "model.num_res_blocks=1",
            f"model.attn_resolutions=[{args.resolution // 2}]",
        ]
    return [
        *model,
        "data=digits",
        f"data.resolution={args.resolution}",
        f"data.batch_size={args.batch}",
        f"trainer.max_steps={args.steps}",
        "trainer.enable_model_summary=false",
        "checkpoint.every_n_steps=1000000",
        "sample_grid.every_n_steps=0",
        "sample_grid.num=4",
        "sample_grid.steps=2",
        "progress_bar=false",
        *extra,
    ]


# --- the Lightning path ----------------------------------------------------------------------
def run_lightning(args, extra: list[str], callbacks: list | None = None) -> dict:
    from diffctl.train import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("train", overrides(args, extra), tmp)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = train(cfg, callbacks=callbacks)
    out = {"images_per_s": result["steady_images_per_s"]}
    if torch.cuda.is_available():
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# --- the floor: a hand-written loop ----------------------------------------------------------
def training_setup(args):
    """diffctl's network, SDE constants and batches for the config, built once."""
    from diffctl.build import build_denoiser, build_objective, build_sde
    from diffctl.train import build_datamodule

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("train", overrides(args, []), tmp)
    data = build_datamodule(cfg)
    data.setup("fit")
    batches = [batch["image"] for batch in data.train_dataloader()][: max(8, args.steps)]
    shape = {"channels": data.channels, "resolution": data.resolution, "num_classes": 0}
    sde = build_sde(cfg)
    denoiser = build_denoiser(cfg, sde, build_objective(cfg, sde), shape)
    return cfg, denoiser.net, batches


def diffusers_unet(args):
    """diffusers' UNet2DModel shaped like diffctl's benchmark U-Net: widths (b, 2b, 2b), one res block
    per level down (two up), attention at the middle level and in the middle block, one head."""
    from diffusers import UNet2DModel

    b = args.base_channels
    return UNet2DModel(
        sample_size=args.resolution,
        in_channels=1,
        out_channels=1,
        block_out_channels=(b, 2 * b, 2 * b),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2 * b,
        norm_num_groups=8,
    )


def forward_of(net):
    """net(x, noise_labels) -> output tensor for diffctl's networks and diffusers' (which wrap it)."""
    return (lambda x, t: net(x, t).sample) if type(net).__module__.startswith("diffusers") else net


def raw_stepper(args, cfg, net, batches, precision: str = "32-true"):
    """The hand-written loop on its own copy of `net`: returns (one_step, device); each call of
    one_step() is one training step."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = copy.deepcopy(net).to(device).train()
    ema = copy.deepcopy(net).requires_grad_(False)
    speed_up(net, channels_last=use_channels_last(cfg.channels_last, device.type))  # the layout `diffctl train` uses
    params, ema_params = list(net.parameters()), list(ema.parameters())
    o = cfg.optim
    opt = torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=o.foreach, fused=o.fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / o.warmup_steps))
    b0, b1, eps, sd = cfg.sde.beta_min, cfg.sde.beta_max, cfg.sde.eps, cfg.denoiser.sigma_data
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext())
    call = forward_of(net)
    batches = [x.to(device) for x in batches]
    step = 0

    def one_step() -> None:
        nonlocal step
        x0 = batches[step % len(batches)]
        t = eps + (1 - eps) * torch.rand(x0.shape[0], device=device)
        alpha = torch.exp(-0.25 * t * t * (b1 - b0) - 0.5 * t * b0)[:, None, None, None]
        sigma = torch.sqrt(1 - alpha * alpha)
        noise = torch.randn_like(x0)
        x_in = (alpha * x0 + sigma * noise) / torch.sqrt(alpha * alpha * sd * sd + sigma * sigma)
        with autocast:
            out = call(x_in, 1000 * t)
        loss = (out.float() - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        step += 1

    return one_step, device


def run_raw(args, cfg, net, batches, precision: str = "32-true") -> dict:
    """Steps of the hand-written loop; returns images/s (steady) and peak memory."""
    one_step, device = raw_stepper(args, cfg, net, batches, precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stamps = [time.perf_counter()]
    for _ in range(args.steps):
        one_step()
        stamps.append(time.perf_counter())
    out = {"images_per_s": steady_rate(stamps, batches[0].shape[0])}
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class InterleavedRawSteps(L.Callback):
    """After every Lightning training batch, one step of the raw loop; each side timed on its own.

    Separate runs of the two drift apart by up to 30% on a shared machine, more than the overhead
    being measured; steps interleaved one for one see the same machine within a fraction of a
    second. A Lightning interval runs from the end of one raw step to the start of the next: one
    whole Lightning iteration (data fetch, hooks, logging, step, EMA) and nothing of the raw loop."""

    def __init__(self, one_step, device: torch.device):
        self.one_step, self.device = one_step, device
        self.lightning: list[float] = []
        self.raw: list[float] = []
        self._resumed: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        start = self._now()
        if self._resumed is not None:
            self.lightning.append(start - self._resumed)
        self.one_step()
        self._resumed = self._now()
        self.raw.append(self._resumed - start)


def run_interleaved(args, cfg, net, batches) -> dict:
    """Lightning and raw-loop steps alternating in one run: images/s of each and their paired ratio."""
    one_step, device = raw_stepper(args, cfg, net, batches)
    timer = InterleavedRawSteps(one_step, device)
    run_lightning(args, [], callbacks=[timer])
    skip = max(1, len(timer.lightning) // 10)  # warm-up, as in steady_rate
    lightning, raw = timer.lightning[skip:], timer.raw[skip + 1 :]  # raw[i + 1] ran right after lightning[i]
    return {
        "lightning_images_per_s": args.batch / statistics.median(lightning),
        "raw_images_per_s": args.batch / statistics.median(raw),
        "lightning_vs_raw": statistics.median(r / l for l, r in zip(lightning, raw)),
    }


def net_facts(net, args, precision: str = "32-true", checkpointing: bool = False) -> dict:
    net = copy.deepcopy(net).train()
    if checkpointing:
        net.gradient_checkpointing = True  # diffctl's U-Net switch (model.gradient_checkpointing)
    x, t = torch.randn(args.batch, 1, args.resolution, args.resolution), torch.rand(args.batch) * 1000
    call = forward_of(net)
    fwd = lambda: call(x, t)  # noqa: E731
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    with autocast:
        saved = saved_activation_bytes(fwd)
    with torch.no_grad():
        flops = count_flops(fwd) / args.batch
    return {
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "gflops_per_image_fwd": flops / 1e9,
        "activations_mib": saved / 2**20,
    }


# --- the benchmark ---------------------------------------------------------------------------
def variants(args, cfg) -> list[tuple[str, str, list[str]]]:
    """(name, kind, overrides or precision). Lightning rows flip one switch from its default."""
    nhwc = use_channels_last(cfg.channels_last, "cuda" if torch.cuda.is_available() else "cpu")
    rows = [
        ("raw loop", "raw", ["32-true"]),
        ("lightning", "lightning", []),
        ("lightning + progress bar", "lightning", ["progress_bar=true"]),
        ("diffusers UNet2DModel (raw loop)", "diffusers", ["32-true"]),
        ("raw loop bf16-mixed", "raw", ["bf16-mixed"]),
        ("lightning bf16-mixed", "lightning", ["trainer.precision=bf16-mixed"]),
        ("lightning 16-mixed", "lightning", ["trainer.precision=16-mixed"]),
        (f"lightning channels_last={str(not nhwc).lower()}", "lightning", [f"channels_last={str(not nhwc).lower()}"]),
        (f"lightning optim.foreach={str(not cfg.optim.foreach).lower()}", "lightning", [f"optim.foreach={str(not cfg.optim.foreach).lower()}"]),
        ("lightning gradient checkpointing", "lightning", ["model.gradient_checkpointing=true"]),
    ]
    if not args.quick and not args.no_compile:
        rows.append(("lightning compile", "lightning", ["compile=true"]))
        rows.append(("lightning compile bf16-mixed", "lightning", ["compile=true", "trainer.precision=bf16-mixed"]))
    if args.model != "unet":  # diffusers' matched network is a U-Net
        rows = [r for r in rows if r[1] != "diffusers"]
    if not torch.cuda.is_available():  # fp16 with loss scaling is a GPU feature; compiled bf16 is slow on CPU
        rows = [r for r in rows if r[0] not in ("lightning 16-mixed", "lightning compile bf16-mixed")]
    return rows


def run_benchmark(args) -> dict:
    cfg, net, batches = training_setup(args)
    rows = variants(args, cfg)
    theirs = diffusers_unet(args) if any(kind == "diffusers" for _, kind, _ in rows) else None
    measured: dict[str, list[dict]] = {name: [] for name, _, _ in rows}
    interleaved: list[dict] = []
    run_raw(args, cfg, net, batches)  # untimed: warms the allocator, thread pool and CPU clocks
    for repeat in range(args.repeats):
        print(f"[repeat {repeat + 1}/{args.repeats}] lightning and raw loop, step-interleaved", flush=True)
        interleaved.append(run_interleaved(args, cfg, net, batches))
        for name, kind, extra in rows:
            if "compile" in name and repeat > 0:
                continue  # compiling again only re-measures the cache; one long run is enough
            print(f"[repeat {repeat + 1}/{args.repeats}] {name}", flush=True)
            if kind == "lightning":
                measured[name].append(run_lightning(args, extra))
            else:
                measured[name].append(run_raw(args, cfg, theirs if kind == "diffusers" else net, batches, extra[0]))
    ours_facts = net_facts(net, args)
    theirs_facts = net_facts(theirs, args) if theirs is not None else None
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None)
    table = []
    for name, kind, extra in rows:
        runs = measured[name]
        speed = statistics.median(m["images_per_s"] for m in runs)
        facts = theirs_facts if kind == "diffusers" else ours_facts
        if any("gradient_checkpointing=true" in e for e in extra):
            facts = net_facts(net, args, checkpointing=True)
        elif "bf16" in name or "16-mixed" in name:  # the activations bf16 autocast keeps (fp16: the same size)
            facts = net_facts(net, args, precision="bf16-mixed")
        row = {
            "variant": name,
            "images_per_s": round(speed, 2),
            "spread": [round(m["images_per_s"], 2) for m in runs],
            "params_m": round(facts["params_m"], 3),
            "gflops_per_image_fwd": round(facts["gflops_per_image_fwd"], 4),
            "activations_mib": round(facts["activations_mib"], 1),
        }
        if peak:  # model FLOPs of forward + backward (3x forward), recomputation not counted
            row["mfu_pct"] = round(100 * 3 * facts["gflops_per_image_fwd"] * 1e9 * speed / (peak * 1e12), 2)
        if runs and "peak_mib" in runs[0]:
            row["peak_mib"] = round(statistics.median(m["peak_mib"] for m in runs), 1)
        table.append(row)
    score(table)
    return {
        "benchmark": "train",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "environment": environment(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "peak_tflops": peak,
        "rows": table,
        "interleaved": interleaved,
        "summary": summarize(table, interleaved),
    }


def score(table: list[dict]) -> None:
    """vs_raw_loop: the median over repeats of (row / raw loop of the same repeat). Pairing within a
    repeat cancels the machine's slow drifts, which move whole repeats by 30% here."""
    raw = next(r for r in table if r["variant"] == "raw loop")["spread"]
    for r in table:
        r["vs_raw_loop"] = round(statistics.median(v / b for v, b in zip(r["spread"], raw)), 3)


def summarize(table: list[dict], interleaved: list[dict] | None = None) -> dict:
    """Lightning overhead from the step-interleaved runs (median over repeats of the per-step paired
    ratio; the separate-run figure is kept beside it) and our U-Net against diffusers'."""
    by = {r["variant"]: r for r in table}
    out = {}
    if interleaved:
        ratios = [r["lightning_vs_raw"] for r in interleaved]
        out["lightning_overhead_pct"] = round(100 * (1 - statistics.median(ratios)), 1)
        out["lightning_overhead_pct_range"] = [round(100 * (1 - max(ratios)), 1), round(100 * (1 - min(ratios)), 1)]
    out["lightning_overhead_pct_separate_runs"] = round(100 * (1 - by["lightning"]["vs_raw_loop"]), 1)
    theirs = by.get("diffusers UNet2DModel (raw loop)")
    if theirs:
        ours_flops, theirs_flops = by["raw loop"]["gflops_per_image_fwd"], theirs["gflops_per_image_fwd"]
        out["ours_vs_diffusers"] = round(1 / theirs["vs_raw_loop"], 3)
        out["ours_vs_diffusers_per_flop"] = round(ours_flops / (theirs["vs_raw_loop"] * theirs_flops), 3)
    mfu = {r["variant"]: r["mfu_pct"] for r in table if "mfu_pct" in r and r["variant"].startswith("lightning")}
    if mfu:
        out["best_lightning_mfu_pct"] = max(mfu.values())
        out["best_lightning_mfu_variant"] = max(mfu, key=mfu.get)
    return out


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    model = f"DiT-{s['dit_size']}/{s['patch_size']}" if s.get("model") == "dit" else f"U-Net b={s['base_channels']}"
    peak = report.get("peak_tflops")
    table = Table(title=f"training throughput: {model}, {s['resolution']}x{s['resolution']}, batch {s['batch']}, "
                        f"{report['environment']['device']}, {report['environment']['threads']} threads")
    columns = ["variant", "images/s", "vs raw loop", "runs", "params (M)", "GFLOP/img fwd", "activations MiB", "peak MiB"]
    for col in columns + ([f"MFU % of {peak:g} TFLOP/s"] if peak else []):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in report["rows"]:
        cells = [r["variant"], f"{r['images_per_s']:.1f}", f"{r['vs_raw_loop']:.3f}", " ".join(f"{v:.0f}" for v in r["spread"]),
                 f"{r['params_m']:.3f}", f"{r['gflops_per_image_fwd']:.3f}", f"{r['activations_mib']:.1f}", str(r.get("peak_mib", "-"))]
        table.add_row(*cells, *([f"{r['mfu_pct']:.1f}"] if peak else []))
    console = Console(width=150)
    console.print(table)
    sm = report["summary"]
    if "lightning_overhead_pct" in sm:
        lo, hi = sm["lightning_overhead_pct_range"]
        console.print(f"Lightning overhead vs the raw loop, steps interleaved: {sm['lightning_overhead_pct']:.1f}% "
                      f"(repeats {lo:.1f}..{hi:.1f}%; goal <= 5%)")
    console.print(f"Lightning overhead vs the raw loop, separate runs: {sm['lightning_overhead_pct_separate_runs']:.1f}% "
                  "(machine drift between runs included)")
    if "ours_vs_diffusers" in sm:
        console.print(f"our U-Net vs diffusers UNet2DModel, same loop: {sm['ours_vs_diffusers']:.3f}x images/s, "
                      f"{sm['ours_vs_diffusers_per_flop']:.3f}x per FLOP (goal >= 1)")
    if "best_lightning_mfu_pct" in sm:
        console.print(f"best MFU, {sm['best_lightning_mfu_variant']}: {sm['best_lightning_mfu_pct']:.1f}% "
                      f"of {peak:g} TFLOP/s (goal for DiT-B/2 on H100 bf16: >= 40%)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, quick="8 steps, 1 repeat, no compile")
    p.add_argument("--steps", type=int, default=30, help="training steps per run")
    p.add_argument("--model", choices=("unet", "dit"), default="unet", help="the network every row trains")
    p.add_argument("--dit-size", choices=("tiny", "S", "B", "L", "XL"), default="B",
                   help="DiT paper size (--model dit); tiny: the small CPU default of conf/model/dit.yaml")
    p.add_argument("--patch-size", type=int, default=2, help="DiT patch size (--model dit)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU; default: the bf16 dense peak of a known GPU (H100, H200, A100), else no MFU")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant (median; 5 for tighter numbers)")
    p.add_argument("--json", default="bench_train.json")
    p.add_argument("--rescore", default=None, help="a bench_train.json: recompute its ratios and summary, print; no training")
    args = p.parse_args(argv)
    if args.rescore:
        report = json.loads(Path(args.rescore).read_text())
        score(report["rows"])
        report["summary"] = summarize(report["rows"], report.get("interleaved"))
        print_report(report)
        write_json(report, args.json)
        return report
    if args.quick:
        args.steps, args.repeats = 8, 1
    report = run_benchmark(args)
    print_report(report)
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
