"""`diffctl reflow`'s measurements and report: the straightness of a model's paths and the table of
straightness and FID at few Euler steps, before and after reflow (diffctl/reflow.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from diffctl.generation import guided_model, sample_cond
from diffctl.noise import sample_noise
from diffctl.source import load_source
from diffctl.straightness import straightness


def measure_straightness(plan: dict, ckpt: str, dev: torch.device) -> dict:
    """Mean straightness (diffctl/straightness.py) of eval.straightness_samples paths of `ckpt` with
    eval.straightness_steps trailing Euler (DDIM) steps, from the noise of eval.seed, sample i from
    (seed, i) as `diffctl sample` draws it and clipped as it samples (clip_denoised)."""
    ev = plan["eval"]
    cfg = OmegaConf.create({"use_ema": plan["use_ema"], "clip_denoised": plan["clip_denoised"], "class_label": None, "guidance": 1.0})
    source = load_source(cfg, ckpt)
    source.denoiser.to(dev)
    model = guided_model(cfg, source).to(dev)
    n, total = ev["straightness_samples"], torch.zeros((), dtype=torch.float64)
    for first in range(0, n, plan["batch_size"]):
        m = min(plan["batch_size"], n - first)
        noise = sample_noise(ev["seed"], range(first, first + m), dev, plan["noise"])
        x = model.sde.prior_std() * noise.randn(source.shape, device=dev)
        s, _ = straightness(model, x, ev["straightness_steps"], sample_cond(cfg, model, first, m, dev))
        total += s.sum().cpu()
    return {"straightness": float(total / n)}


def report(plan: dict, run: Path) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from diffctl.console import cell, print_paths

    steps, ev = plan["eval"]["steps"], plan["eval"]
    table = Table(title="diffctl reflow: done")
    for column in ("model", f"straightness ({ev['straightness_steps']} steps)", *(f"FID, {k} step{'s' if k > 1 else ''}" for k in steps)):
        table.add_column(column, overflow="fold")
    names = {"teacher": "before (1-rectified)", "reflow": "after reflow"}
    for who, name in names.items():
        row = plan["results"].get(who, {})
        fids = [cell(row.get(f"fid_{k}")) if row.get(f"fid_{k}") is not None else "withheld" for k in steps]
        table.add_row(name, cell(row.get("straightness")), *fids)
    console = Console()
    console.print(table)
    console.print(f"{ev['num_samples']} samples each (seed {ev['seed']}), sampler=ddim spacing=trailing (Euler on sde=linear); "
                  "FID is withheld below metrics.fid_min_samples. Sample the reflowed model with: "
                  f"diffctl sample ckpt={run / 'train'} sampler=ddim steps=<k>", highlight=False, soft_wrap=True)  # fmt: skip
    print_paths({"pairs": run / "pairs.npz", "reflowed model": run / "train", "results": run / "reflow.json"}, console)
    return {"run_dir": str(run), "results": plan["results"]}
