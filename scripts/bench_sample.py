#!/usr/bin/env python
"""Sampling throughput: diffctl's samplers against diffusers' pipelines driving the same network at
equal NFE, plus each sampling speed switch on/off.

    python scripts/bench_sample.py                    # about 6 minutes on 2 CPU cores
    python scripts/bench_sample.py --quick            # smoke run: fewer batches, no compile
    python scripts/bench_sample.py --ckpt outputs/train/<date>/<time> --batch 64 --steps 50

Rows (images/s, the median over --batches timed batches after one warm-up batch; the rows take
turns batch by batch so load drifts hit them alike):
- `DDIM-50`: diffctl `ddim` (eta 0, trailing, clip_denoised as `diffctl sample` does for images) vs
  diffusers `DDIMPipeline` (DDIMScheduler, trailing, clip_sample) - 50 network evaluations each;
- `DPM-Solver++(2M)-50`: diffctl `ode` solver=dpmpp_2m vs diffusers `DDPMPipeline` with
  `DPMSolverMultistepScheduler` (2M, 50 evaluations each);
- `DDPM-50`: the ancestral sampler (fresh noise each step) vs `DDPMPipeline` with DDPMScheduler.
  diffctl draws each sample's noise as a function of (seed, sample, draw) (same images for any batch
  size or device count); diffusers is given one generator for the batch, its default.
- noise (scripts/noise_rows.py): one draw of per-sample noise (counter, noise=2; per-sample
  generators, noise=1) against one torch.randn of the same shape and device, at 8000x8, 32x256 and
  500x3072 (CPU, and CUDA when available); `model=gmm` ddpm against ddim at equal steps; and
  training noise on one rank of 1/8/64 (its own rows vs the global batch drawn on every rank);
- switches on diffctl's DDIM-50, each flipped from `diffctl sample`'s default: channels_last (default
  auto: on for CPU), precision=bf16-mixed, compile, and the autograd setting (inference_mode, the
  default, vs no_grad vs autograd left on); and diffusers' DDIMPipeline with the network in NHWC too.
Both sides call the same module: diffctl's U-Net behind diffctl.s DiffusionModel (input scaling, eps
output); diffusers sees it through a thin adapter mapping its integer timestep k to t = (k+1)/1000.
Without --ckpt the network is the benchmark U-Net of scripts/bench_train.py with random weights
(speed does not depend on the weights at a fixed NFE).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import add_common_args, environment, write_json  # noqa: E402
from noise_rows import NOISE_SHAPES, gmm_rows, noise_rows, print_noise, training_rows  # noqa: E402

import diffctl  # noqa: E402,F401  (torchvision shim first)
from diffctl.config import compose_config  # noqa: E402
from diffctl.denoiser import ClippedModel  # noqa: E402
from diffctl.performance import sampling_autocast, speed_up, use_channels_last  # noqa: E402
from diffctl.samplers import SAMPLERS, generate  # noqa: E402


def build_denoiser(args):
    """(denoiser, shape): from --ckpt, or the bench_train U-Net freshly initialised."""
    if args.ckpt:
        from diffctl.build import load_denoiser

        denoiser, cfg = load_denoiser(args.ckpt, use_ema=True)
        shape = (cfg.data_shape.channels, cfg.data_shape.resolution, cfg.data_shape.resolution)
        return denoiser.eval(), shape
    from diffctl.build import build_denoiser as build, build_objective, build_sde

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("train", [
            "model=unet", f"model.base_channels={args.base_channels}", "model.channel_mult=[1,2,2]",
            "model.num_res_blocks=1", f"model.attn_resolutions=[{args.resolution // 2}]",
        ], tmp)
    shape = {"channels": 1, "resolution": args.resolution, "num_classes": 0}
    torch.manual_seed(0)
    sde = build_sde(cfg)
    denoiser = build(cfg, sde, build_objective(cfg, sde), shape)
    return denoiser.eval().requires_grad_(True), (1, args.resolution, args.resolution)


class AsDiffusersModel(nn.Module):
    """diffctl's denoiser as diffusers pipelines call a UNet2DModel: model(x, k).sample = eps, k the
    integer training timestep of a 1000-step discretization of the same VP process."""

    def __init__(self, denoiser, shape):
        super().__init__()
        self.denoiser = denoiser
        self.config = SimpleNamespace(in_channels=shape[0], sample_size=shape[1])

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return next(self.denoiser.parameters()).device

    def forward(self, x, k):
        t = (torch.as_tensor(k, dtype=x.dtype, device=x.device).expand(x.shape[0]) + 1) / 1000
        return SimpleNamespace(sample=self.denoiser(x, t).eps)


def diffusers_pipelines(denoiser, shape):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

    model = AsDiffusersModel(denoiser, shape)
    schedule = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    pipes = {
        "ddim": DDIMPipeline(model, DDIMScheduler(**schedule, timestep_spacing="trailing", clip_sample=True)),
        "dpmpp_2m": DDPMPipeline(model, DPMSolverMultistepScheduler(**schedule, algorithm_type="dpmsolver++", solver_order=2)),
        "ddpm": DDPMPipeline(model, DDPMScheduler(**schedule, timestep_spacing="trailing", clip_sample=True)),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def ours(denoiser, shape, sampler: dict, steps: int, batch: int, precision="32-true", grad: str = "inference_mode"):
    model = ClippedModel(denoiser)  # what `diffctl sample` samples images with (clip_denoised)
    device = next(denoiser.parameters()).device

    def run(index: int):
        name = sampler["name"]
        original = SAMPLERS[name]
        if grad != "inference_mode":  # the undecorated sampler under the requested autograd mode
            SAMPLERS[name] = dataclasses.replace(original, fn=original.fn.__wrapped__)
        try:
            mode = torch.no_grad() if grad == "no_grad" else torch.enable_grad() if grad == "autograd" else contextlib.nullcontext()
            with mode, sampling_autocast(precision, device):
                return generate(model, batch, shape, sampler, steps, seed=0, device=device, first_index=index * batch)
        finally:
            SAMPLERS[name] = original

    return run


def theirs(pipe, steps: int, batch: int, **kwargs):
    def run(index: int):
        return pipe(batch_size=batch, generator=torch.Generator().manual_seed(index), num_inference_steps=steps,
                    output_type="np", **kwargs)

    return run


def rows(args, denoiser, shape, compiled):
    """diffctl rows use `diffctl sample`'s defaults (channels_last=auto); diffusers rows theirs."""
    default_nhwc = use_channels_last("auto", next(denoiser.parameters()).device.type)
    nhwc = _copy(denoiser)
    speed_up(nhwc.net, channels_last=True)
    default, other = (nhwc, denoiser) if default_nhwc else (denoiser, nhwc)
    pipes = diffusers_pipelines(denoiser, shape)
    s, b = args.steps, args.batch
    ddim = {"name": "ddim", "eta": 0.0, "spacing": "trailing"}
    dpm = {"name": "ode", "solver": "dpmpp_2m", "spacing": "logsnr"}
    ddpm = {"name": "ddpm", "spacing": "trailing"}
    table = [
        ("DDIM", "diffctl", ours(default, shape, ddim, s, b)),
        ("DDIM", "diffusers DDIMPipeline", theirs(pipes["ddim"], s, b, eta=0.0)),
        ("DPM-Solver++(2M)", "diffctl", ours(default, shape, dpm, s, b)),
        ("DPM-Solver++(2M)", "diffusers DDPMPipeline + DPMSolverMultistep", theirs(pipes["dpmpp_2m"], s, b)),
        ("DDPM", "diffctl", ours(default, shape, ddpm, s, b)),
        ("DDPM", "diffusers DDPMPipeline", theirs(pipes["ddpm"], s, b)),
        ("DDIM", f"diffctl channels_last={str(not default_nhwc).lower()}", ours(other, shape, ddim, s, b)),
        ("DDIM", "diffusers DDIMPipeline, channels_last network", theirs(diffusers_pipelines(nhwc, shape)["ddim"], s, b, eta=0.0)),
        ("DDIM", "diffctl precision=bf16-mixed", ours(default, shape, ddim, s, b, precision="bf16-mixed")),
        ("DDIM", "diffctl no_grad (not inference_mode)", ours(default, shape, ddim, s, b, grad="no_grad")),
        ("DDIM", "diffctl autograd left on", ours(default, shape, ddim, s, b, grad="autograd")),
    ]
    if compiled is not None:
        table.append(("DDIM", "diffctl compile", ours(compiled, shape, ddim, s, b)))
    return table


def _copy(denoiser):
    import copy

    return copy.deepcopy(denoiser)


def run_benchmark(args) -> dict:
    torch.manual_seed(0)
    denoiser, shape = build_denoiser(args)
    calls = [0]  # network evaluations, counted on the module both sides call (copies share the hook)
    denoiser.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    compiled = None
    if not (args.quick or args.no_compile):
        compiled = _copy(denoiser)
        speed_up(compiled.net, use_channels_last("auto", next(denoiser.parameters()).device.type), compile=True)
    table = rows(args, denoiser, shape, compiled)
    times: list[list[float]] = [[] for _ in table]
    nfe = [0] * len(table)
    for batch_index in range(args.batches + 1):  # batch 0 warms up (and compiles)
        for i, (sampler, who, run) in enumerate(table):
            print(f"[batch {batch_index}/{args.batches}] {sampler}: {who}", flush=True)
            t0, before = time.perf_counter(), calls[0]
            run(batch_index)
            nfe[i] = calls[0] - before
            if batch_index > 0:
                times[i].append(time.perf_counter() - t0)
    out = []
    for (sampler, who, _), ts, n in zip(table, times, nfe):
        out.append({"sampler": sampler, "who": who, "nfe": n, "images_per_s": round(args.batch / statistics.median(ts), 2),
                    "spread": [round(args.batch / t, 2) for t in ts]})
    by = {(r["sampler"], r["who"]): r["images_per_s"] for r in out}
    for r in out:
        base = by[(r["sampler"], "diffctl")]
        theirs_key = next(((s, w) for (s, w) in by if s == r["sampler"] and w.startswith("diffusers")), None)
        r["vs_diffctl_default"] = round(r["images_per_s"] / base, 3)
        r["vs_diffusers"] = round(r["images_per_s"] / by[theirs_key], 3) if theirs_key else None
    return {
        "benchmark": "sample",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "environment": environment(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": out,
        "noise": noise_rows(repeats=3 if args.quick else 15, shapes=NOISE_SHAPES[1:2] if args.quick else NOISE_SHAPES),
        "gmm_ddpm_vs_ddim": gmm_rows(500 if args.quick else args.gmm_num, 5 if args.quick else args.gmm_steps, 1 if args.quick else 3,
                                     args.gmm_batch),
        "training_noise": training_rows(repeats=1 if args.quick else 5, worlds=(1, 8) if args.quick else (1, 8, 64)),
    }


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"sampling throughput at {s['steps']} NFE, batch {s['batch']}, {report['environment']['device']}, "
                        f"{report['environment']['threads']} threads")
    for col in ("sampler", "who", "NFE", "images/s", "vs diffusers", "vs diffctl default", "batches"):
        table.add_column(col, justify="left" if col in ("sampler", "who") else "right")
    for r in report["rows"]:
        vs = "-" if r["vs_diffusers"] is None else f"{r['vs_diffusers']:.3f}"
        table.add_row(r["sampler"], r["who"], str(r["nfe"]), f"{r['images_per_s']:.2f}", vs, f"{r['vs_diffctl_default']:.3f}",
                      " ".join(f"{v:.1f}" for v in r["spread"]))
    console = Console(width=150)
    console.print(table)
    print_noise(console, report["noise"], report["gmm_ddpm_vs_ddim"])
    rows = report["training_noise"]
    console.print("training noise on one rank (ms per step, 128 x 3x32x32 per rank): "
                  + "; ".join(f"world {r['world']}: {r['local_rows_ms']:.1f} own rows vs {r['global_draw_ms']:.1f} global draw" for r in rows))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="a diffctl checkpoint or run directory (default: a fresh benchmark U-Net)")
    add_common_args(p, quick="5 steps, 1 timed batch, no compile")
    p.add_argument("--steps", type=int, default=50, help="network evaluations per sample (NFE)")
    p.add_argument("--batches", type=int, default=7, help="timed batches per row (median)")
    p.add_argument("--gmm-num", type=int, default=8000, help="model=gmm samples of the ddpm vs ddim rows (one batch)")
    p.add_argument("--gmm-steps", type=int, default=100, help="steps of the ddpm vs ddim rows")
    p.add_argument("--gmm-batch", type=int, default=64, help="batch_size of the ddpm vs ddim rows (diffctl sample's default)")
    p.add_argument("--json", default="bench_sample.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batches = 5, 1
    report = run_benchmark(args)
    print_report(report)
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
