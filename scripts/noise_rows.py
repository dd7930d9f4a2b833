"""bench_sample.py's noise rows: what per-sample noise costs against one torch.randn, and what it
costs a stochastic sampler (ddpm) against the deterministic ddim on the analytic mixture.

Both tables time their variants in turns (variant a, b, c, then a, b, c again ...) and report the
median of each, so load drifts on a shared machine hit every variant alike; the ratios come from
one run.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

# The three shapes: a mixture batch, a 16x16 gray batch, a CIFAR batch.
NOISE_SHAPES = ((8000, (8,)), (32, (256,)), (500, (3072,)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(variants: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each callable, timed in turns after one warm-up call each."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats + 1):
        for name, fn in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def noise_rows(repeats: int = 15, shapes=NOISE_SHAPES) -> list[dict]:
    """Per sampler step, one draw of a batch: counter noise (version 2, the default), per-sample
    generators (version 1, diffctl before), and one torch.randn of the same shape on the same device."""
    from diffctl.noise import sample_noise

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    out = []
    for device in devices:
        for batch, shape in shapes:
            counter = sample_noise(0, range(batch), device, version=2)
            legacy = sample_noise(0, range(batch), device, version=1)
            one = torch.Generator(device=device).manual_seed(0)
            t = _interleaved({  # called within this iteration: default arguments bind its values
                "counter": lambda c=counter, s=shape, d=device: c.randn(s, device=d),
                "per_sample_generators": lambda g=legacy, s=shape, d=device: g.randn(s, device=d),
                "one_randn": lambda b=batch, s=shape, g=one, d=device: torch.randn((b, *s), generator=g, device=d),
            }, repeats, device)  # fmt: skip
            out.append({
                "device": device.type, "batch": batch, "elements": shape[0],
                **{f"{k}_ms": round(1e3 * v, 4) for k, v in t.items()},
                "counter_vs_randn": round(t["counter"] / t["one_randn"], 2),
                "per_sample_generators_vs_randn": round(t["per_sample_generators"] / t["one_randn"], 2),
            })  # fmt: skip
    return out


def training_rows(repeats: int = 5, local: int = 128, shape=(3, 32, 32), worlds=(1, 8, 64)) -> list[dict]:
    """Training noise on one rank of `world`: diffctl's BatchRandom.randn (counter noise, this rank's
    rows only) against drawing the whole global batch with one generator and keeping this rank's
    slice (diffctl before), ms per step; rank 0's cost, on the CPU."""
    from diffctl.rng import BatchRandom

    out = []
    for world in worlds:
        gen = torch.Generator().manual_seed(0)
        t = _interleaved({
            "local_rows": lambda w=world: BatchRandom(0, 1, 0, 0, w, local, "cpu").randn((local, *shape)),
            "global_draw": lambda w=world: torch.randn((local * w, *shape), generator=gen)[:local],
        }, repeats, torch.device("cpu"))  # fmt: skip
        out.append({"world": world, "local_batch": local, **{f"{k}_ms": round(1e3 * v, 3) for k, v in t.items()}})
    return out


def gmm_rows(num: int, steps: int, repeats: int, batch: int = 64) -> dict:
    """`diffctl sample model=gmm` (the analytic mixture of conf/model/gmm.yaml, VP, no clipping) with
    sampler=ddpm (noise 2 and noise 1) and sampler=ddim (eta 0, no noise after the start) at equal
    steps, in batches of `batch` (its batch_size; default 64, the command's); seconds, median of `repeats`."""
    from diffctl.config import compose_config
    from diffctl.networks.gmm import GaussianMixture, MixtureModel
    from diffctl.samplers import generate
    from diffctl.sde import VPSDE

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("sample", ["model=gmm"], tmp)
    mixture = GaussianMixture.from_config(cfg.model)
    den = MixtureModel(mixture, VPSDE())

    def run(sampler, version=2):
        for first in range(0, num, batch):
            generate(den, min(batch, num - first), mixture.shape, sampler, steps, seed=0, first_index=first, noise_version=version)

    t = _interleaved({
        "ddpm": lambda: run("ddpm"),
        "ddpm_noise1": lambda: run("ddpm", 1),
        "ddim": lambda: run("ddim"),
    }, repeats, torch.device("cpu"))  # fmt: skip
    return {"num_samples": num, "batch": batch, "steps": steps, **{f"{k}_s": round(v, 4) for k, v in t.items()},
            "ddpm_vs_ddim": round(t["ddpm"] / t["ddim"], 2), "ddpm_noise1_vs_ddim": round(t["ddpm_noise1"] / t["ddim"], 2)}


def print_noise(console, noise: list[dict], gmm: dict) -> None:
    from rich.table import Table

    table = Table(title="per-sample noise, one draw of a batch (median ms; ratio to one torch.randn of the same shape)")
    for col in ("device", "batch x elements", "counter (noise=2)", "per-sample generators (noise=1)", "one torch.randn",
                "counter / randn", "generators / randn"):
        table.add_column(col, justify="right")
    for r in noise:
        table.add_row(r["device"], f"{r['batch']} x {r['elements']}", f"{r['counter_ms']:.3f}", f"{r['per_sample_generators_ms']:.3f}",
                      f"{r['one_randn_ms']:.3f}", f"{r['counter_vs_randn']:.2f}", f"{r['per_sample_generators_vs_randn']:.2f}")
    console.print(table)
    console.print(f"model=gmm, {gmm['num_samples']} samples in batches of {gmm['batch']}, {gmm['steps']} steps: ddpm {gmm['ddpm_s']:.3f} s, "
                  f"ddpm noise=1 {gmm['ddpm_noise1_s']:.3f} s, ddim {gmm['ddim_s']:.3f} s; ddpm / ddim = {gmm['ddpm_vs_ddim']:.2f} "
                  f"(noise=1: {gmm['ddpm_noise1_vs_ddim']:.2f})")
