#!/usr/bin/env python
"""Image-to-image: diffusion against plain baselines (SR3's comparison, Saharia et al. 2021) at CPU scale.

    python scripts/bench_img2img.py                 # the README's run (2000/2000 training steps, 200 test images)
    python scripts/bench_img2img.py --num 100 --steps-train 300 --reg-steps 200 --steps ddim:20   # a 6-minute look
    python scripts/bench_img2img.py --quick         # toy sizes (the test)

Two tasks, each with the same U-Net (base 16, channel_mult [1,2], one res block, no attention):
- sr: Fashion-MNIST 14 -> 28 (condition=sr condition.factor=2, PIL-style antialiased bicubic down, bicubic up),
  tested on the first --num test images;
- colorize: 16x16 patches of scikit-learn's two sample photos (load_sample_images), the left 3/4 of each
  photo for training, patches of the right quarter for testing (written as PNG folders, data=imagefolder).
Rows per task: the plain baseline (sr: the bicubic-upsampled source itself; colorize: the gray luma replicated
to RGB), the one-step regressor (objective=regression, sampled with ddim steps=1: its x0 prediction), and the
diffusion model (objective=ddpm), one row per --steps entry (sampler:steps, e.g. DDIM eta=0 with 20 steps,
ancestral DDPM with 100 as SR3 samples). FID and KID (offline EDM Inception, metrics.detector=edm)
are against the targets of the same --num images; FID from a few hundred images is biased upwards, so compare
rows with each other only. LPIPS is null unless --lpips <torchvision backbone weights file> is given.
Writes bench_img2img.json (rows, settings, environment) and bench_img2img.png (examples of each row).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import environment, write_json  # noqa: E402

import diffctl  # noqa: E402,F401  (torchvision shim first)
from diffctl.config import compose_config  # noqa: E402

NET = ["model.base_channels=16", "model.channel_mult=[1,2]", "model.attn_resolutions=[]", "model.num_res_blocks=1"]


def colorize_folders(root: Path, patch: int) -> tuple[Path, Path]:
    """train/ and test/ folders of patch x patch PNGs from the two sample photos (test: the right quarter)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    dirs = root / "train", root / "test"
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    for k, photo in enumerate(load_sample_images().images):
        small = np.asarray(Image.fromarray(photo).resize((photo.shape[1] // 2, photo.shape[0] // 2), Image.BICUBIC))
        h, w = small.shape[:2]
        cut = (3 * w // 4) // patch * patch
        for i in range(0, h - patch + 1, patch):
            for j in range(0, w - patch + 1, patch):
                d = dirs[0] if j + patch <= cut else dirs[1]
                Image.fromarray(small[i:i + patch, j:j + patch]).save(d / f"{k}_{i:03d}_{j:03d}.png")
    return dirs


def train_run(run_dir: Path, data: list[str], objective: str, steps: int, batch: int) -> float:
    from diffctl.train import train

    import json

    summary = run_dir / "train_summary.json"
    if summary.is_file():  # a finished run of an earlier invocation with the same --work: reuse it, with its own time
        last = json.loads(summary.read_text())[-1]
        if last["global_step"] == steps:
            print(f"reusing {run_dir} ({steps} steps, trained in {last['time_s']:.0f} s)")
            return float(last["time_s"])
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train(compose_config("train", [*data, *NET, f"objective={objective}", f"trainer.max_steps={steps}", f"data.batch_size={batch}",
                                   "optim.lr=1e-3", "ema.decay=0.995", "sample_grid.every_n_steps=0", "progress_bar=false"], run_dir))
    return time.perf_counter() - t0


def metric_overrides(args, ref: str, ref_root: str | None) -> list[str]:
    return [f"metrics.detector={args.detector}", "metrics.names=[fid,kid]", "metrics.fid_min_samples=0", f"metrics.ref={ref}",
            f"metrics.ref_limit={args.num}", f"metrics.kid_subset_size={min(args.num, 100)}", f"metrics.cache_dir={Path(args.cache_dir).expanduser()}",
            "metrics.progress_bar=false", *([f"metrics.ref_root={ref_root}"] if ref_root else []),
            *([f"metrics.detector_path={args.detector_path}"] if args.detector_path else [])]


def sample_row(label: str, ckpt: Path, source: str, sampler: list[str], steps: int, args, out: Path, ref: str, ref_root) -> dict:
    from diffctl.sample import sample

    cfg = compose_config("sample", [f"ckpt={ckpt}", f"source={source}", *sampler, f"steps={steps}", f"num_samples={args.num}",
                                    f"batch_size={args.num}", "seed=0", "progress_bar=false",
                                    *([f"source_root={ref_root}"] if ref_root else []),
                                    *([f"lpips={args.lpips}"] if args.lpips else []), *metric_overrides(args, ref, ref_root)], out)
    t0 = time.perf_counter()
    r = sample(cfg)
    return {"row": label, "psnr": r.get("psnr"), "ssim": r.get("ssim"), "lpips": r.get("lpips"), "fid": r.get("fid"),
            "kid": r.get("kid_mean"), "consistency": r.get("consistency"), "nfe": r["nfe_per_sample"],
            "time_s": round(time.perf_counter() - t0, 1), "npz": str(out / "samples.npz")}


def baseline_row(label: str, npz: str, args, out: Path, ref: str, ref_root, conditioner) -> dict:
    """The sources themselves as the outputs (sr: bicubic upsampling; colorize: gray as RGB), scored as sample does."""
    import torch
    import torchmetrics.functional.image as tm

    from diffctl.metrics_command import metrics_command

    z = np.load(npz)
    src, tgt = z["sources"], z["targets"]
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "baseline.npz", samples=src)
    a = torch.from_numpy(src).permute(0, 3, 1, 2).double() / 127.5 - 1
    b = torch.from_numpy(tgt).permute(0, 3, 1, 2).double() / 127.5 - 1
    t0 = time.perf_counter()
    mc = [o.removeprefix("metrics.") for o in metric_overrides(args, ref, ref_root)]
    scores = metrics_command(compose_config("metrics_command", [f"images={out / 'baseline.npz'}", "download=false", *mc], out / "m"))
    consistency = None
    if hasattr(conditioner, "downsample"):
        consistency = float((conditioner.downsample(a.float()) - conditioner.downsample(b.float())).abs().mean())
    return {"row": label, "psnr": float(tm.peak_signal_noise_ratio(a, b, data_range=2.0, reduction="none", dim=(1, 2, 3)).mean()),
            "ssim": float(tm.structural_similarity_index_measure(a, b, data_range=2.0, reduction="none").mean()), "lpips": None,
            "fid": scores.get("fid"), "kid": scores.get("kid_mean"), "consistency": consistency, "nfe": 0,
            "time_s": round(time.perf_counter() - t0, 1), "npz": str(out / "baseline.npz")}


def run_task(task: str, args, work: Path) -> list[dict]:
    from diffctl.image_conditions import Colorization, SuperResolution

    if task == "sr":
        data = ["data=fashion_mnist", "data.num_workers=0", *([f"data.root={args.fmnist_root}"] if args.fmnist_root else []),
                "condition=sr", "condition.factor=2", *([f"data.limit={args.limit}"] if args.limit else [])]
        source, ref, ref_root, baseline = "fashion_mnist:test", "fashion_mnist:test", args.fmnist_root, "bicubic upsampling"
        conditioner = SuperResolution(1, 28, factor=2)
    else:
        train_dir, test_dir = colorize_folders(work / "patches", args.patch)
        data = ["data=imagefolder", f"data.root={train_dir}", f"data.resolution={args.patch}", "data.num_workers=0",
                "data.random_flip=true", "condition=colorize"]
        source, ref, ref_root, baseline = str(test_dir), str(test_dir), None, "gray as RGB"
        conditioner = Colorization(3, args.patch)
    train_s = {}
    for objective, steps in (("regression", args.reg_steps), ("ddpm", args.steps_train)):
        train_s[objective] = round(train_run(work / task / objective, data, objective, steps, args.batch), 1)
    rows = [sample_row("regressor (1 step)", work / task / "regression", source, ["sampler=ddim"], 1, args, work / task / "s_reg", ref, ref_root)]
    for sampler, steps in args.steps:
        rows.append(sample_row(f"diffusion ({sampler.upper()} {steps})", work / task / "ddpm", source, [f"sampler={sampler}"], steps, args,
                               work / task / f"s_{sampler}{steps}", ref, ref_root))
    rows.insert(0, baseline_row(baseline, rows[0]["npz"], args, work / task / "base", ref, ref_root, conditioner))
    rows[1]["train_s"], train_s_d = train_s["regression"], train_s["ddpm"]
    for r in rows[2:]:
        r["train_s"] = train_s_d
    for r in rows:
        r["task"] = task
    return rows


def plot(rows: list[dict], path: Path, k: int = 8) -> None:
    """One panel per task: a row of k test images per method (source, each row of the table, target),
    the k spread evenly over the test images (colorize's first patches are all sky)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(len(tasks), 1, figsize=(1.1 * k + 2.4, 1.15 * 5 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        mine = [r for r in rows if r["task"] == task]
        first = np.load(mine[1]["npz"])
        pick = np.unique(np.linspace(0, len(first["targets"]) - 1, k).round().astype(int))
        source = first["sources"]
        if source.shape[-1] != first["targets"].shape[-1]:
            source = np.repeat(source, first["targets"].shape[-1], -1)
        named = [("source", source)] + [(r["row"], source if i == 0 else np.load(r["npz"])["samples"]) for i, r in enumerate(mine)]
        named = [named[0]] + named[2:] + [("target", first["targets"])]  # the baseline row is the source shown as an image
        named[0] = ("source", source)
        grid = np.concatenate([np.concatenate(list(imgs[pick]), 1) for _, imgs in named], 0)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        h = source.shape[1]
        ax.set_yticks([h * (i + 0.5) for i in range(len(named))], [n for n, _ in named], fontsize=8)
        ax.set_xticks([])
        ax.set_title(f"{task} (the source row is the baseline '{mine[0]['row']}')", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def sampler_steps(text: str) -> list[tuple[str, int]]:
    out = []
    for part in text.split(","):
        sampler, _, steps = part.rpartition(":")
        out.append((sampler or "ddim", int(steps)))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["sr", "colorize"])
    p.add_argument("--num", type=int, default=200, help="test images per row (also the FID reference: their targets)")
    p.add_argument("--steps-train", type=int, default=2000, help="training steps of the diffusion model")
    p.add_argument("--reg-steps", type=int, default=2000, help="training steps of the regressor")
    p.add_argument("--steps", type=sampler_steps, default=sampler_steps("ddim:20,ddpm:100"),
                   help="the diffusion rows: sampler:steps, comma-separated (a bare number: DDIM)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--patch", type=int, default=16, help="colorize patch side")
    p.add_argument("--limit", type=int, default=None, help="sr: first N training images")
    p.add_argument("--fmnist-root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX directory (conf/data/fashion_mnist.yaml default)")
    p.add_argument("--lpips", default=None, help="torchvision backbone weights file for LPIPS (none: LPIPS null)")
    p.add_argument("--detector", default="edm")
    p.add_argument("--detector-path", default=None)
    p.add_argument("--cache-dir", default="~/.cache/diffctl")
    p.add_argument("--work", default=None, help="where runs are kept (default: a temporary directory); finished training runs there are reused")
    p.add_argument("--quick", action="store_true", help="toy sizes: 8 test images, 4 training steps")
    p.add_argument("--json", default="scripts/results/bench_img2img.json")
    p.add_argument("--plot", default="scripts/results/bench_img2img.png")
    args = p.parse_args(argv)
    if args.quick:
        args.num, args.steps_train, args.reg_steps, args.steps, args.batch = 8, 4, 4, [("ddim", 2)], 8
        args.limit = args.limit or 64
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        rows = [r for task in args.tasks for r in run_task(task, args, work)]
        plot(rows, Path(args.plot))
    for r in rows:
        r.pop("npz")
    report = {"benchmark": "img2img", "date": _dt.datetime.now().isoformat(timespec="seconds"), "environment": environment(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")}, "network": NET, "rows": rows,
              "total_s": round(time.perf_counter() - t0, 1)}
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
