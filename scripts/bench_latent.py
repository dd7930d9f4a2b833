#!/usr/bin/env python
"""Pixel-space against latent-space diffusion at equal training wall-clock (issue 18).

    python scripts/bench_latent.py --work /tmp/bench_latent            # everything (see the README for the time)
    python scripts/bench_latent.py --work /tmp/bl --first-stage <run>  # reuse a train-autoencoder run / VAE folder

Fashion-MNIST at 32x32 (bilinear, as conf/data/fashion_mnist.yaml suggests for U-Nets). Steps:
  1. `diffctl train-autoencoder` with f = 4 and 4 latent channels (latents 4x8x8: 4x fewer numbers than
     the 1x32x32 images), unless --first-stage is given;
  2. `diffctl train` of a pixel U-Net and of a latent U-Net (one level fewer: 8x8 inputs), each for
     --minutes of training (Lightning's max_time; the latent run's one-off encoding of the training set
     is outside it and reported on its own);
  3. `diffctl sample` of --num images from each (EMA weights, --sampler/--steps, the same seeds);
  4. every image set scored by `diffctl metrics` against the same --ref-limit training images with the
     same detector: the two models' samples, the autoencoder's reconstructions of the first --num test
     images (rFID: the floor a latent model cannot beat) and those test images themselves (the floor of
     FID at this sample count: FID from a few hundred images is biased upwards).
Writes bench_latent.json and bench_latent.png (FID against training time is not drawn: one point per
model; the picture is a grid of samples from each row).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import add_scoring_args, environment, finish  # noqa: E402

import diffctl  # noqa: E402,F401  (torchvision shim first)
from diffctl.config import compose_config  # noqa: E402

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"  # conf/data/fashion_mnist.yaml's root (Debian's dataset-fashion-mnist)
DATA = ["data=fashion_mnist", "data.resolution=32", "data.num_workers=0", "data.batch_size=64"]
AUTOENCODER = [  # f = 2 ** (levels - 1) = 4, latents 4 x 8 x 8
    "model.block_out_channels=[32,64,64]", "model.layers_per_block=1", "model.latent_channels=4", "model.norm_num_groups=16",
]
PIXEL_UNET = ["model=unet", "model.base_channels=32", "model.channel_mult=[1,2,2]", "model.attn_resolutions=[8]", "model.num_res_blocks=2"]
LATENT_UNET = ["model=unet", "model.base_channels=32", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]", "model.num_res_blocks=2"]
COMMON_TRAIN = ["optim.lr=1e-3", "ema.decay=0.999", "sample_grid.every_n_steps=0", "trainer.max_steps=10000000", "progress_bar=false"]


def _max_time(minutes: float) -> str:
    s = int(round(minutes * 60))
    return f"+trainer.max_time=00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train_autoencoder(args, run_dir: Path) -> dict:
    from diffctl.train_autoencoder import train_autoencoder as run

    t0 = time.perf_counter()
    result = run(compose_config("train_autoencoder", [*DATA, *AUTOENCODER, f"trainer.max_steps={args.ae_steps}",
                                                      "progress_bar=false", "report.rfid=false", "report.num_images=200", *args.ae_override], run_dir))  # fmt: skip
    return {"run_dir": str(run_dir), "steps": result["global_step"], "wall_s": round(time.perf_counter() - t0, 1)}


def train_diffusion(args, run_dir: Path, extra: list[str]) -> dict:
    from diffctl.train import train

    t0 = time.perf_counter()
    result = train(compose_config("train", [*DATA, *COMMON_TRAIN, _max_time(args.minutes), *extra], run_dir))
    summary = json.loads((run_dir / "train_summary.json").read_text())[-1]
    return {"run_dir": str(run_dir), "steps": result["global_step"], "train_s": summary["time_s"],
            "wall_s": round(time.perf_counter() - t0, 1), "images_per_s": summary["images_per_s"],
            "steady_images_per_s": summary["steady_images_per_s"]}  # fmt: skip


def sample_images(args, ckpt: str, out: Path) -> dict:
    from diffctl.sample import sample

    result = sample(compose_config("sample", [
        f"ckpt={ckpt}", f"sampler={args.sampler}", f"steps={args.steps}", f"num_samples={args.num}", f"batch_size={args.batch}",
        f"seed={args.seed}", "progress_bar=false", "metrics.names=[]",
    ], out))  # fmt: skip
    return {"samples": str(out / "samples.npz"), "sample_s": result["time_s"], "images_per_s": round(args.num / result["time_s"], 2),
            "nfe": result["nfe_per_sample"]}  # fmt: skip


def test_images_and_reconstructions(args, first_stage: str, work: Path) -> tuple[Path, Path, float]:
    """The first --num test images at 32x32 and decode(mean of q(z|x)) of each, as samples.npz-style files."""
    import numpy as np
    import torch

    from diffctl.conditioning import IMAGE
    from diffctl.data import build_dataset
    from diffctl.first_stage import load_first_stage
    from diffctl.images import to_uint8

    data = build_dataset("fashion_mnist", FASHION_ROOT, "test", 32, 1, limit=args.num)
    x = torch.stack([data[i][IMAGE] for i in range(len(data))])
    autoencoder = load_first_stage(first_stage)
    t0 = time.perf_counter()
    with torch.no_grad():
        recon = torch.cat([autoencoder.decode(autoencoder.encode(b).mean) for b in x.split(args.batch)]).clamp(-1, 1)
    seconds = time.perf_counter() - t0
    paths = work / "test.npz", work / "reconstructions.npz"
    for path, images in zip(paths, (x, recon)):
        np.savez(path, samples=to_uint8(images).numpy())
    return (*paths, round(seconds, 2))


def score(args, images: Path, name: str) -> dict:
    """FID and KID of `images`; the metrics run (its metrics.json) is kept in <work>/scores/<name>."""
    from diffctl.metrics_command import metrics_command

    out = Path(args.work) / "scores" / name
    out.mkdir(parents=True)
    result = metrics_command(compose_config("metrics_command", [
        f"images={images}", "ref=fashion_mnist:train", f"ref_root={FASHION_ROOT}", f"ref_limit={args.ref_limit}", f"detector={args.detector}",
        "names=[fid,kid]", "fid_min_samples=0", f"kid_subset_size={min(args.num, args.ref_limit, 1000)}",
        f"cache_dir={Path(args.cache_dir).expanduser()}", "progress_bar=false",
    ], out))  # fmt: skip
    return {"fid": result["fid"], "kid": result["kid_mean"], "kid_std": result["kid_std"]}


def run_benchmark(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "latent", "date": _dt.datetime.now().isoformat(timespec="seconds"), "environment": environment(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")}}  # fmt: skip
    first_stage = args.first_stage
    if first_stage is None:
        print("1/4 train-autoencoder", flush=True)
        report["autoencoder"] = train_autoencoder(args, work / "autoencoder")
        first_stage = str(work / "autoencoder")
    report["first_stage"] = first_stage
    print("2/4 pixel and latent diffusion", flush=True)
    pixel = train_diffusion(args, work / "pixel", PIXEL_UNET)
    latent = train_diffusion(args, work / "latent", [*LATENT_UNET, f"first_stage={first_stage}", f"latent.cache_dir={work / 'cache'}"])
    print("3/4 sampling", flush=True)
    pixel.update(sample_images(args, pixel["run_dir"], work / "pixel_samples"))
    latent.update(sample_images(args, latent["run_dir"], work / "latent_samples"))
    print("4/4 scoring", flush=True)
    test, recon, recon_s = test_images_and_reconstructions(args, first_stage, work)
    rows = [
        {"row": "test images (FID floor at this count)", **score(args, test, "test")},
        {"row": "autoencoder reconstructions (rFID)", "reconstruct_s": recon_s, **score(args, recon, "reconstructions")},
        {"row": "pixel diffusion", **pixel, **score(args, Path(pixel["samples"]), "pixel")},
        {"row": "latent diffusion", **latent, **score(args, Path(latent["samples"]), "latent")},
    ]
    report["rows"] = rows
    return report


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"Fashion-MNIST 32x32, {s['minutes']} min of training each, {s['num']} images vs "
                        f"{s['ref_limit']} training images ({s['detector']} detector)")  # fmt: skip
    for col in ("row", "FID", "KID x1e3", "steps", "train img/s", "sample img/s"):
        table.add_column(col, justify="left" if col == "row" else "right")

    def cell(r, key, fmt="{:.1f}"):
        return fmt.format(r[key]) if r.get(key) is not None else ""

    for r in report["rows"]:
        table.add_row(r["row"], cell(r, "fid", "{:.2f}"), f"{1e3 * r['kid']:.2f}", cell(r, "steps", "{}"),
                      cell(r, "steady_images_per_s"), cell(r, "images_per_s"))  # fmt: skip
    Console(width=150).print(table)


def plot(report: dict, path: Path) -> None:
    """Side by side: 64 samples of the pixel model, 64 of the latent model, 64 reconstructions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    work = Path(report["settings"]["work"])
    panels = [("pixel diffusion", Path(report["rows"][2]["samples"])), ("latent diffusion", Path(report["rows"][3]["samples"])),
              ("autoencoder reconstructions", work / "reconstructions.npz"), ("test images", work / "test.npz")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for ax, (title, npz) in zip(axes, panels):
        images = np.load(npz)["samples"][:64, :, :, 0]
        n = int(np.sqrt(len(images)))
        grid = images[: n * n].reshape(n, n, *images.shape[1:]).transpose(0, 2, 1, 3).reshape(n * images.shape[1], -1)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
        fid = next(r["fid"] for r in report["rows"] if r["row"].startswith(title))
        ax.set_title(f"{title}\nFID {fid:.1f}", fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="outputs/bench_latent", help="run directories, caches and image files (must be new or reusable)")
    p.add_argument("--first-stage", default=None, help="a train-autoencoder run or a diffusers AutoencoderKL folder (skips step 1)")
    p.add_argument("--ae-steps", type=int, default=3000, help="train-autoencoder steps")
    p.add_argument("--ae-override", nargs="*", default=[], help="extra train-autoencoder overrides")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock of each diffusion model")
    p.add_argument("--num", type=int, default=500, help="images per row")
    p.add_argument("--ref-limit", type=int, default=2000, help="training images in the FID reference")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--sampler", default="ode")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    add_scoring_args(p, "bench_latent")
    args = p.parse_args(argv)
    return finish(run_benchmark(args), args, print_report, plot)


if __name__ == "__main__":
    main()
