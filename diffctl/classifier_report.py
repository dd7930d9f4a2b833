"""What `diffctl train-classifier` reports: the classifier's accuracy on held-out images against the
noise level (bins of t or of log SNR = log(alpha^2 / sigma^2)), and at t = eps (clean), as a rich
table, accuracy.json and accuracy.png.

Every image of every bin gets its own noise level, drawn uniformly within the bin (in t, or in log
SNR), and its own noise, both counter-based (diffctl.noise) from (report.seed, bin, image index):
the report does not depend on the batch size or the device count, and two runs compare."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from diffctl.checkpoint import atomic_write
from diffctl.classifier import NoisyClassifier, images_and_labels
from diffctl.noise import normals
from diffctl.rng import mix_seed
from diffctl.sde import SDE

BIN_BY = ("t", "logsnr")
CLEAN = -1  # the bin number keying the clean (t = eps) evaluation's noise


def log_snr(sde: SDE, t: Tensor) -> Tensor:
    """log(alpha^2 / sigma^2), decreasing in t."""
    return -2.0 * torch.log(sde.noise_ratio(torch.as_tensor(t, dtype=torch.float64)))


def bin_edges(sde: SDE, bins: int, by: str) -> list[tuple[float, float]]:
    """(low, high) of each bin in t, or in log SNR from the highest (t = eps) down, as the table shows them."""
    if by not in BIN_BY:
        raise ValueError(f"report.bin_by must be one of {', '.join(BIN_BY)}, got {by!r}")
    if by == "t":
        lo, hi = sde.eps, sde.T
    else:
        lo, hi = (float(log_snr(sde, torch.tensor(v))) for v in (sde.eps, sde.T))
    edges = [lo + (hi - lo) * k / bins for k in range(bins + 1)]
    return list(zip(edges[:-1], edges[1:]))


def bin_times(sde: SDE, edge: tuple[float, float], by: str, u: Tensor) -> Tensor:
    """Times for uniforms u in [0, 1): uniform in t within the bin, or uniform in log SNR."""
    value = edge[0] + (edge[1] - edge[0]) * u.double()
    if by == "t":
        return value
    return sde.t_from_noise_ratio(torch.exp(-0.5 * value)).clamp(sde.eps, sde.T)


@torch.no_grad()
def _evaluate(classifier: NoisyClassifier, loader: DataLoader, key: int, times, device) -> dict[str, float]:
    """Accuracy and mean NLL (nats) at x_t of every image; times(u) gives each image's t."""
    correct, nll, seen = 0, 0.0, 0
    for x0, y in map(images_and_labels, loader):
        x0, y = x0.to(device), y.to(device)
        rows = torch.arange(seen, seen + len(y), device=device)
        u = 0.5 * torch.erfc(-normals(key, rows, 0, ()).double() / math.sqrt(2.0))  # Phi(z): uniform in (0, 1)
        t = times(u).to(device=device, dtype=x0.dtype)
        x = classifier.sde.marginal(x0, t, normals(key, rows, 1, tuple(x0.shape[1:])).to(x0.dtype))
        logp = classifier.log_probs(x, t)
        correct += int((logp.argmax(-1) == y).sum())
        nll -= float(logp.gather(1, y[:, None]).sum())
        seen += len(y)
    return {"accuracy": correct / seen, "nll": nll / seen, "images": seen}


def accuracy_report(classifier: NoisyClassifier, dataset: Dataset, report, device="cpu", held_out: bool = True) -> dict[str, Any]:
    """The report of the classifier (EMA weights) on `dataset`; report: the config's report node."""
    sde, by = classifier.sde, report["bin_by"]
    if report.get("limit"):
        dataset = Subset(dataset, range(min(int(report["limit"]), len(dataset))))
    loader = DataLoader(dataset, batch_size=int(report["batch_size"]), shuffle=False)
    classifier = classifier.to(device).eval()
    rows = []
    for b, edge in enumerate(bin_edges(sde, int(report["bins"]), by)):
        result = _evaluate(classifier, loader, mix_seed(report["seed"], b), lambda u, e=edge: bin_times(sde, e, by, u), device)
        t_edge = edge if by == "t" else tuple(float(bin_times(sde, edge, by, torch.tensor(v))) for v in (0.0, 1.0))
        snr_edge = edge if by == "logsnr" else tuple(float(log_snr(sde, torch.tensor(v))) for v in edge)
        rows.append({"bin": b, "t": list(t_edge), "logsnr": list(snr_edge), **result})
    clean = _evaluate(classifier, loader, mix_seed(report["seed"], CLEAN), lambda u: torch.full_like(u, sde.eps), device)
    return {
        "bin_by": by, "sde": repr(sde), "num_classes": classifier.num_classes, "chance": 1.0 / classifier.num_classes,
        "held_out": held_out, "clean": {"t": sde.eps, **clean}, "bins": rows,
    }  # fmt: skip


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    split = "held-out test split" if report["held_out"] else "training images (imagefolder has no held-out split)"
    table = Table(title=f"classifier accuracy against noise level ({split})",
                  caption=f"clean (t = eps): {report['clean']['accuracy']:.3f}; chance {report['chance']:.3f}")  # fmt: skip
    for name in ("bin", "t", "log SNR", "accuracy", "NLL (nats)"):
        table.add_column(name, justify="right")
    for row in report["bins"]:
        table.add_row(str(row["bin"]), "{:.3f}-{:.3f}".format(*row["t"]), "{:.2f} to {:.2f}".format(*row["logsnr"]),
                      f"{row['accuracy']:.3f}", f"{row['nll']:.3f}")  # fmt: skip
    Console().print(table)


def write_report(report: dict[str, Any], run_dir: Path) -> dict[str, Path]:
    """accuracy.json and accuracy.png in run_dir, each written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    paths = {"accuracy": run_dir / "accuracy.json", "plot": run_dir / "accuracy.png"}
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(paths["accuracy"], lambda f: f.write(text.encode()))
    by = report["bin_by"]
    centers = [sum(row[by]) / 2 for row in report["bins"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(centers, [row["accuracy"] for row in report["bins"]], "o-", label="accuracy in bin")
    ax.axhline(report["clean"]["accuracy"], color="tab:green", ls="--", label="clean (t = eps)")
    ax.axhline(report["chance"], color="gray", ls=":", label="chance")
    ax.set_xlabel("diffusion time t" if by == "t" else "log SNR = log(alpha^2 / sigma^2)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(report["sde"], fontsize=8)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(paths["plot"], lambda f: f.write(buffer.getvalue()))
    return paths
