"""Pictures for the README: classifier guidance and inpainting against the exact answers of a mixture.

    python scripts/figures_issue16.py [--samples 4000]

guidance.png: a 1-D three-component mixture sampled with ddpm (200 steps, vp) unconditionally and
  with the exact classifier p(k | x_t) at scales 1 and 3 for k = 2, over the exact densities: at
  scale 1 the guided samples are component k exactly; at scale 3 they are sharper than component k
  but are NOT the tilted density p(x) p(k | x)^3 (the guided score is that density's score at every
  level, but the reverse process it drives does not end there; see diffctl/guidance.py).
inpaint.png: a 2-D mixture with coordinate 0 known; the exact conditional p(x1 | x0) against
  RePaint (200 logsnr levels, jump 2, resample 20) and plain replacement (the same levels, no jumps).
Writes scripts/results/{guidance,inpaint}.png and figures_issue16.json (the figures' numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from diffctl.guidance import ClassifierGuided, ExactMixtureClassifier
from diffctl.inpaint import inpaint
from diffctl.mixture_conditional import conditional
from diffctl.networks.gmm import GaussianMixture, MixtureModel
from diffctl.samplers import generate
from diffctl.sde import VPSDE

RESULTS = Path(__file__).resolve().parent / "results"


def _density(mixture: GaussianMixture, grid: torch.Tensor) -> np.ndarray:
    return mixture.log_prob(grid.reshape(-1, 1)).exp().numpy()


def guidance_figure(n: int) -> dict:
    import matplotlib.pyplot as plt

    mixture = GaussianMixture([[-2.0], [0.0], [2.0]], scales=[0.5, 0.5, 0.5], weights=[0.3, 0.4, 0.3])
    sde, k = VPSDE(), 2
    model = MixtureModel(mixture, sde)
    classifier = ExactMixtureClassifier(mixture, sde)
    grid = torch.linspace(-4.5, 4.5, 901, dtype=torch.float64)
    step = float(grid[1] - grid[0])
    p = _density(mixture, grid)
    post = mixture.responsibilities(grid.reshape(-1, 1))[:, k].numpy()
    component = np.exp(-0.5 * ((grid.numpy() - 2.0) / 0.5) ** 2) / (0.5 * math.sqrt(2 * math.pi))
    tilted = p * post**3
    tilted /= tilted.sum() * step
    cond = {"class_label": torch.full((n,), k)}
    runs = {"unconditional": generate(model, n, (1,), "ddpm", 200, seed=0)}
    for scale in (1.0, 3.0):
        runs[f"guided s={scale:g}"] = generate(ClassifierGuided(model, classifier, scale), n, (1,), "ddpm", 200, seed=0, cond=cond)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(grid, p, "k-", lw=1, label="p(x)")
    ax.plot(grid, component, "C1-", lw=1.5, label=f"component k={k}")
    ax.plot(grid, tilted, "C3--", lw=1.5, label="p(x) p(k|x)^3, normalized")
    for (name, x), color in zip(runs.items(), ("0.6", "C1", "C3")):
        ax.hist(x.reshape(-1).numpy(), bins=90, range=(-4.5, 4.5), density=True, histtype="step", color=color, lw=1.2, label=f"ddpm, {name}")
    ax.set(xlabel="x", ylabel="density", title="Classifier guidance with the exact classifier (1-D mixture, vp, ddpm 200 steps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "guidance.png", dpi=120)
    tilted_mean = float((grid.numpy() * tilted).sum() * step)
    return {"samples": n, "component_mean": 2.0, "component_std": 0.5, "tilted_s3_mean": round(tilted_mean, 4),
            **{f"{name} mean": round(float(x.mean()), 4) for name, x in runs.items()},
            **{f"{name} std": round(float(x.std()), 4) for name, x in runs.items()}}  # fmt: skip


def inpaint_figure(n: int) -> dict:
    import matplotlib.pyplot as plt

    cov = [[0.5, 0.35], [0.35, 0.5]]  # correlated: the known coordinate moves the unknown one within a component
    mixture = GaussianMixture([[-1.0, -1.0], [1.0, 1.5]], covariances=[cov, cov], weights=[0.5, 0.5])
    sde, x0 = VPSDE(), 0.2
    model = MixtureModel(mixture, sde)
    known_mask = torch.tensor([True, False])
    exact = conditional(mixture, known_mask, torch.tensor([x0, 0.0], dtype=torch.float64))
    grid = torch.linspace(-4.0, 4.5, 851, dtype=torch.float64)
    known = torch.tensor([[x0, 0.0]], dtype=torch.float64).expand(n, 2).contiguous()
    mask = known_mask.double().reshape(1, 2)
    runs = {}
    for method in ("repaint", "replace"):
        t0 = time.perf_counter()
        out = inpaint(model, known, mask, 200, method=method, seed=1, jump_length=2, resample=20, spacing="logsnr")
        runs[method] = (out.images[:, 1], out.nfe, time.perf_counter() - t0)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(grid, _density(exact, grid), "k-", lw=1.5, label=f"exact p(x1 | x0={x0})")
    for (method, (x, nfe, _)), color in zip(runs.items(), ("C0", "C3")):
        ax.hist(x.numpy(), bins=85, range=(-4.0, 4.5), density=True, histtype="step", color=color, lw=1.2, label=f"{method} ({nfe} NFE)")
    ax.set(xlabel="x1 (unknown)", ylabel="density", title="Inpainting a 2-D mixture without retraining (vp, 200 logsnr levels)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "inpaint.png", dpi=120)
    exact_mean = float(exact.mean()[0])
    return {"samples": n, "x0_known": x0, "exact_mean": round(exact_mean, 4), "exact_std": round(float(exact.covariance()[0, 0].sqrt()), 4), "exact_weights": [round(float(w), 4) for w in exact.weights],
            **{f"{m} mean": round(float(x.mean()), 4) for m, (x, _, _) in runs.items()},
            **{f"{m} std": round(float(x.std()), 4) for m, (x, _, _) in runs.items()},
            **{f"{m} nfe": nfe for m, (_, nfe, _) in runs.items()}, **{f"{m} seconds": round(s, 1) for m, (_, _, s) in runs.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    out = {"command": f"python scripts/figures_issue16.py --samples {args.samples}", "guidance": guidance_figure(args.samples),
           "inpaint": inpaint_figure(args.samples)}  # fmt: skip
    (RESULTS / "figures_issue16.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
