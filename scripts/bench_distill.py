#!/usr/bin/env python
"""Few-step sampling: progressive distillation against DDIM on its teacher, consistency distillation,
consistency training, and rectified flow before and after reflow, FID at equal sampling steps (issue 19).

    python scripts/bench_distill.py --work /tmp/bench_distill           # everything (see the README for the time)
    python scripts/bench_distill.py --work /tmp/bd --quick              # a smoke run of every step (minutes)

Fashion-MNIST at --resolution (Debian's dataset-fashion-mnist). Steps:
  1. the teacher: `diffctl train denoiser.prediction=v` for --teacher-minutes (v prediction, as Salimans &
     Ho distil; the same network for every row);
  2. `diffctl distill` from --teacher-steps down to 1 step, --steps-per-round optimizer steps a round;
  3. consistency distillation from the same teacher and consistency training from scratch, each for the
     distillation's total optimizer steps (rounds x steps per round), the same network;
  4. a flow-matching model (`sde=linear objective=flow`, the same network and wall-clock as the teacher) and
     `diffctl reflow` of it: --pairs ODE pairs of --teacher-steps steps, the distillation's total optimizer
     steps of training, and the straightness of both models' paths;
  5. `diffctl sample` of --num images from each model at each step count it is made for (the teacher and
     the flow model with DDIM at every count, which on sde=linear is Euler; each student at its own; the
     consistency models and the reflowed model at 1, 2 and 4), the same seeds;
  6. every image set scored against the same --ref-limit training images with the same detector, and the
     first --num test images themselves (the floor of FID at this sample count).
Writes bench_distill.json and bench_distill.png (FID against sampling steps, one line per method).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import add_scoring_args, environment, finish  # noqa: E402

import diffctl  # noqa: E402,F401  (torchvision shim first)
from diffctl.config import compose_config  # noqa: E402

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
UNET = ["model=unet", "model.base_channels=32", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]", "model.num_res_blocks=2"]
TRAIN = ["sample_grid.every_n_steps=0", "progress_bar=false", "trainer.enable_model_summary=false", "logger=none", "trainer=cpu"]
CONSISTENCY_STEPS = (1, 2, 4)


def data_args(args) -> list[str]:
    limit = [f"data.limit={args.limit}"] if args.limit else []
    return ["data=fashion_mnist", f"data.resolution={args.resolution}", "data.num_workers=0", f"data.batch_size={args.train_batch}", *limit]


def _max_time(minutes: float) -> str:
    s = int(round(minutes * 60))
    return f"+trainer.max_time=00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train(args, run_dir: Path, extra: list[str]) -> dict:
    from diffctl.train import train as run

    t0 = time.perf_counter()
    result = run(compose_config("train", [*data_args(args), *UNET, *TRAIN, "optim.lr=1e-3", "ema.decay=0.999", *extra], run_dir))
    return {"run_dir": str(run_dir), "steps": result["global_step"], "wall_s": round(time.perf_counter() - t0, 1), "loss": result["loss"]}


def distill(args, teacher: str, run_dir: Path) -> dict:
    from diffctl.distill import distill as run

    rounds = args.teacher_steps.bit_length() - 1
    overrides = [*TRAIN, "optim.lr=1e-4", "optim.warmup_steps=0", "ema.decay=0.99", f"data.batch_size={args.train_batch}"]
    t0 = time.perf_counter()
    result = run(compose_config("distill", [f"ckpt={teacher}", f"teacher_steps={args.teacher_steps}", f"rounds={rounds}",
                                            f"steps_per_round={args.steps_per_round}",
                                            "train_overrides=[" + ",".join(f"'{o}'" for o in overrides) + "]"], run_dir))  # fmt: skip
    return {"run_dir": str(run_dir), "rounds": result["rounds"], "wall_s": round(time.perf_counter() - t0, 1)}


def reflow(args, flow: str, run_dir: Path, train_steps: int) -> dict:
    from diffctl.reflow import reflow as run

    overrides = [*TRAIN, "optim.lr=1e-4", "optim.warmup_steps=0", "ema.decay=0.99", f"data.batch_size={args.train_batch}"]
    t0 = time.perf_counter()
    # Its own evaluation is cut to a token (16 samples, unscored): the rows below sample and score it as every other model.
    result = run(compose_config("reflow", [f"ckpt={flow}", f"num_pairs={args.pairs}", f"steps={args.teacher_steps}",
                                           f"batch_size={args.batch}", f"train_steps={train_steps}", "progress_bar=false",
                                           "train_overrides=[" + ",".join(f"'{o}'" for o in overrides) + "]",
                                           "eval.steps=[1]", "eval.num_samples=16", "eval.sample_overrides=['metrics.names=[]']"], run_dir))  # fmt: skip
    res = result["results"]
    return {"run_dir": str(run_dir), "train_dir": str(run_dir / "train"), "wall_s": round(time.perf_counter() - t0, 1),
            "straightness_before": res["teacher"]["straightness"], "straightness_after": res["reflow"]["straightness"]}


def sample_images(args, ckpt: str, out: Path, sampler: str, steps: int) -> dict:
    from diffctl.sample import sample

    result = sample(compose_config("sample", [
        f"ckpt={ckpt}", f"sampler={sampler}", f"steps={steps}", f"num_samples={args.num}", f"batch_size={args.batch}",
        f"seed={args.seed}", "progress_bar=false", "metrics.names=[]",
    ], out))  # fmt: skip
    return {"samples": str(out / "samples.npz"), "sample_s": result["time_s"], "nfe": result["nfe_per_sample"]}


def test_images(args, work: Path) -> Path:
    import numpy as np
    import torch

    from diffctl.conditioning import IMAGE
    from diffctl.data import build_dataset
    from diffctl.images import to_uint8

    data = build_dataset("fashion_mnist", FASHION_ROOT, "test", args.resolution, 1, limit=args.num)
    path = work / "test.npz"
    np.savez(path, samples=to_uint8(torch.stack([data[i][IMAGE] for i in range(len(data))])).numpy())
    return path


def score(args, images: Path, name: str) -> dict:
    from diffctl.metrics_command import metrics_command

    out = Path(args.work) / "scores" / name
    out.mkdir(parents=True)
    result = metrics_command(compose_config("metrics_command", [
        f"images={images}", "ref=fashion_mnist:train", f"ref_root={FASHION_ROOT}", f"ref_limit={args.ref_limit}", f"detector={args.detector}",
        "names=[fid]", "fid_min_samples=0", f"cache_dir={Path(args.cache_dir).expanduser()}", "progress_bar=false",
    ], out))  # fmt: skip
    return {"fid": result["fid"]}


def run_benchmark(args) -> dict:
    if args.teacher_steps & (args.teacher_steps - 1):
        raise SystemExit(f"--teacher-steps must be a power of two (each round halves it down to 1), got {args.teacher_steps}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "distill", "date": _dt.datetime.now().isoformat(timespec="seconds"), "environment": environment(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")}}  # fmt: skip
    print("1/6 teacher", flush=True)
    teacher = report["teacher"] = train(args, work / "teacher", ["denoiser.prediction=v", "trainer.max_steps=10000000", _max_time(args.teacher_minutes)])
    print("2/6 progressive distillation", flush=True)
    report["distill"] = distill(args, teacher["run_dir"], work / "distill")
    total = args.steps_per_round * (args.teacher_steps.bit_length() - 1)
    print("3/6 consistency distillation and training", flush=True)
    consistency = ["objective=consistency", f"trainer.max_steps={total}"]
    report["cd"] = train(args, work / "cd", [*consistency, f"objective.teacher={teacher['run_dir']}", "objective.num_scales_start=18",
                                             "objective.num_scales_end=18", "objective.target_decay_start=0.95", "optim.lr=1e-4"])  # fmt: skip
    report["ct"] = train(args, work / "ct", consistency)
    print("4/6 flow matching and reflow", flush=True)
    flow = report["flow"] = train(args, work / "flow", ["sde=linear", "objective=flow", "trainer.max_steps=10000000", _max_time(args.teacher_minutes)])
    report["reflow"] = reflow(args, flow["run_dir"], work / "reflow", total)
    print("5/6 sampling", flush=True)
    jobs = [("DDIM on the teacher", teacher["run_dir"], "ddim", 2**k) for k in range(args.teacher_steps.bit_length())]
    jobs += [("progressive distillation", r["run_dir"], "ddim", r["student_steps"]) for r in report["distill"]["rounds"]]
    jobs += [(name, report[key]["run_dir"], "consistency", n) for name, key in (("consistency distillation", "cd"), ("consistency training", "ct"))
             for n in CONSISTENCY_STEPS]  # fmt: skip
    jobs += [("Euler on the flow model", flow["run_dir"], "ddim", 2**k) for k in range(args.teacher_steps.bit_length())]
    jobs += [("reflow (2-rectified flow)", report["reflow"]["train_dir"], "ddim", n) for n in CONSISTENCY_STEPS]
    rows = []
    for i, (method, ckpt, sampler, steps) in enumerate(jobs):
        rows.append({"method": method, "steps": steps, **sample_images(args, ckpt, work / "samples" / f"{i:02d}", sampler, steps)})
    print("6/6 scoring", flush=True)
    for i, row in enumerate(rows):
        row.update(score(args, Path(row["samples"]), f"{i:02d}"))
    report["floor"] = score(args, test_images(args, work), "test")
    report["rows"] = rows
    return report


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    steps = sorted({r["steps"] for r in report["rows"]})
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    table = Table(title=f"Fashion-MNIST {s['resolution']}x{s['resolution']}: FID of {s['num']} samples vs {s['ref_limit']} training "
                        f"images ({s['detector']}), by sampling steps; test images: {report['floor']['fid']:.1f}")  # fmt: skip
    table.add_column("method")
    for n in steps:
        table.add_column(str(n), justify="right")
    for m in methods:
        fid = {r["steps"]: r["fid"] for r in report["rows"] if r["method"] == m}
        table.add_row(m, *(f"{fid[n]:.1f}" if n in fid else "" for n in steps))
    console = Console(width=150)
    console.print(table)
    r = report["reflow"]
    console.print(f"straightness of the flow model's paths (Liu et al. eq. 5, 16 Euler steps): {r['straightness_before']:.4f} before reflow, "
                  f"{r['straightness_after']:.4f} after")  # fmt: skip


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in dict.fromkeys(r["method"] for r in report["rows"]):
        points = sorted((r["steps"], r["fid"]) for r in report["rows"] if r["method"] == m)
        ax.plot(*zip(*points), marker="o", label=m)
    ax.axhline(report["floor"]["fid"], color="gray", linestyle=":", label="test images (floor)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps (network evaluations)")
    ax.set_ylabel("FID")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="outputs/bench_distill", help="run directories and image files (must be new)")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--teacher-minutes", type=float, default=15.0, help="training wall-clock of the teacher")
    p.add_argument("--teacher-steps", type=int, default=64, help="the teacher's DDIM steps, a power of two: distilled down to 1")
    p.add_argument("--steps-per-round", type=int, default=500)
    p.add_argument("--pairs", type=int, default=5000, help="reflow's (noise, sample) pairs")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="training images (default: all 60000)")
    p.add_argument("--num", type=int, default=500, help="images per row")
    p.add_argument("--ref-limit", type=int, default=2000, help="training images in the FID reference")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: seconds of training on 512 images, 4 teacher steps, 50 samples")
    add_scoring_args(p, "bench_distill")
    args = p.parse_args(argv)
    if args.quick:
        args.teacher_minutes, args.teacher_steps, args.steps_per_round, args.num, args.ref_limit, args.limit = 0.2, 4, 5, 50, 100, 512
        args.pairs = 64
    return finish(run_benchmark(args), args, print_report, plot)


if __name__ == "__main__":
    main()
