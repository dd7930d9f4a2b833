#!/usr/bin/env python
"""Sampler benchmark against exact answers: diffctl's samplers and diffusers' schedulers driven by
the same analytic Gaussian-mixture model (diffctl/networks/gmm.py), error vs number of network
evaluations (NFE).

    python scripts/bench_samplers.py                          # default run (a few minutes on 2 cores)
    python scripts/bench_samplers.py --narrow-std 0           # without the narrow (std 0.04) component
    python scripts/bench_samplers.py --dim 16 --components 10 --num 4000 --nfe 5,10,20,50 --seed 1

Errors, for every sampler and NFE:
- sw2: sliced Wasserstein-2 (`--directions` random directions) between the samples and as many
  exact samples of the mixture; `floor` is the same distance between two exact sets of that size
  (what a perfect sampler gets), printed with its spread over `--floor-repeats` pairs.
- endpoint (deterministic samplers only): RMS difference per coordinate between the sampler's
  output and a tight-tolerance solve (dopri5, rtol=atol=1e-10, float64) of the exact probability-flow
  ODE from the same start noise at the sampler's own starting noise level down to sigma/alpha = 1e-5,
  then E[x0 | x] there. This isolates the solver's discretization error.

Both sides use the same start noise z (per-sample counter noise keyed by (seed, i), as `diffctl
sample` draws it), scaled to each sampler's initial state. The model is exact float64
`GaussianMixture.denoise` at the (alpha, sigma) the sampler means at that call:
- ours: alpha(t), sigma(t) of the continuous VP SDE (beta 0.1..20) or VE SDE at the level's time t;
- DDPMScheduler / DDIMScheduler: integer timestep t -> alpha^2 = alphas_cumprod[t], sigma^2 = 1 - alpha^2;
- EulerDiscrete / HeunDiscrete / DPMSolverMultistep: the scheduler's sigma s = scheduler.sigmas[step index]
  (Karras-style sigma = sigma/alpha of the VP process; for Euler/Heun the model sees scale_model_input's
  x = y / sqrt(s^2 + 1)) -> alpha = 1/sqrt(1 + s^2), sigma = s alpha;
- ScoreSdeVeScheduler: the pipeline's sigma_t = scheduler.sigmas[i] -> alpha = 1, sigma = sigma_t, and
  the model outputs the score -eps/sigma_t.
tests/test_diffusers_oracle.py checks each mapping (the scheduler's own x0 from our eps equals the
model's x0 at every step).

Pairs (ours ~ diffusers) are compared at equal NFE, each with its documented default settings and
with the best of the listed settings at that NFE; the primary metric is the endpoint error for
deterministic pairs and sw2 for stochastic ones (a difference below 2 floor standard deviations
is a tie).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import environment  # noqa: E402

from diffctl.distances import random_directions, sliced_wasserstein  # noqa: E402
from diffctl.networks.gmm import GaussianMixture, MixtureModel  # noqa: E402
from diffctl.samplers import ddim, ddpm, ode, pc  # noqa: E402
from diffctl.noise import sample_noise  # noqa: E402
from diffctl.sde import VESDE, VPSDE  # noqa: E402

DEFAULT_NFE = (5, 10, 20, 50, 100, 1000)
REF_S_END = 1e-5  # the reference ODE runs down to sigma/alpha = REF_S_END, then takes E[x0 | x]
REF_TOL = 1e-10
# Our VP is continuous (alpha^2 = exp(-int beta)), diffusers' is DDPM's discrete product of
# (1 - beta_i): two slightly different ODEs. With identical spacings and solvers (the trailing rows,
# whose updates tests/test_diffusers_oracle.py shows are the same) endpoint errors differ by up to
# 0.9%, so a ratio within 1% is a tie, not a win or a loss.
SCHEDULE_TOLERANCE = 0.01
# The model's training schedule, given to every discrete diffusers scheduler as a pipeline's
# scheduler config would (HeunDiscreteScheduler's own defaults are Stable Diffusion's 0.00085..0.012).
DDPM_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}

# Families: how a target NFE becomes a step count, and the NFE that step count really costs (the
# same formula on both sides: Heun with n levels is n-1 Heun steps + a final Euler step to 0 in both
# diffctl and diffusers; pc / ScoreSdeVe with n levels is n corrector + n predictor evaluations).
FAMILIES = {
    "ddpm": {"steps": lambda e: e, "nfe": lambda n: n, "deterministic": False},
    "ddim": {"steps": lambda e: e, "nfe": lambda n: n, "deterministic": True},
    "euler": {"steps": lambda e: e, "nfe": lambda n: n, "deterministic": True},
    "heun": {"steps": lambda e: (e + 1) // 2, "nfe": lambda n: 2 * n - 1, "deterministic": True},
    "dpmpp_2m": {"steps": lambda e: e, "nfe": lambda n: n, "deterministic": True},
    "rk4": {"steps": lambda e: (e + 3) // 4, "nfe": lambda n: 4 * n - 3, "deterministic": True},
    "pc_ve": {"steps": lambda e: max(e // 2, 1), "nfe": lambda n: 2 * n, "deterministic": False},
}
PAIR_NAMES = {
    "ddpm": ("ddpm", "DDPMScheduler"),
    "ddim": ("ddim eta=0", "DDIMScheduler"),
    "euler": ("ode euler", "EulerDiscreteScheduler"),
    "heun": ("ode heun", "HeunDiscreteScheduler"),
    "dpmpp_2m": ("ode dpmpp_2m", "DPMSolverMultistepScheduler"),
    "pc_ve": ("pc (VE)", "ScoreSdeVeScheduler"),
}


# ---------------------------------------------------------------------------------------------
# the ground truth


def make_mixture(dim: int, components: int, seed: int, mean_scale: float, narrow_std: float = 0.0) -> GaussianMixture:
    """K isotropic components: means ~ N(0, mean_scale^2 I), stds uniform in [0.1, 0.5], weights
    proportional to uniform [1, 2]; reproducible from `seed`. narrow_std > 0: the first component's
    std instead (a narrow component, where uneven level spacing and the last solver steps show)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    means = mean_scale * torch.randn(components, dim, generator=g, dtype=torch.float64)
    scales = 0.1 + 0.4 * torch.rand(components, generator=g, dtype=torch.float64)
    if narrow_std > 0:
        scales[0] = narrow_std
    weights = 1.0 + torch.rand(components, generator=g, dtype=torch.float64)
    return GaussianMixture(means, scales=scales, weights=weights / weights.sum())


class Counted(torch.nn.Module):
    """A denoiser that counts its calls (one call = one network evaluation of the batch)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sde, self.calls = inner, inner.sde, 0

    def forward(self, x, t, cond=None):
        self.calls += 1
        return self.inner(x, t, cond)


class ExactModel:
    """The mixture as an eps / score network for diffusers: call(x, alpha, sigma) -> (x0, eps),
    float64, with a call counter and the x0 of the last call (for the mapping check)."""

    def __init__(self, mixture: GaussianMixture):
        self.mixture, self.calls, self.last_x0 = mixture, 0, None

    def __call__(self, x: torch.Tensor, alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        x0, eps = self.mixture.denoise(x.double(), float(alpha), float(sigma))
        self.last_x0 = x0
        return x0, eps


def reference_endpoints(mixture: GaussianMixture, starts: list[tuple[float, torch.Tensor]]) -> list[torch.Tensor]:
    """Exact PF-ODE endpoints for start states (s0, y0) with y = x/alpha, s = sigma/alpha:
    dy/du = s eps(y, s) in u = log s, integrated by dopri5 from log s0 to log REF_S_END in one batch
    (each start rescaled to a common clock tau in [0, 1]), then x0 = E[x0 | y] at REF_S_END."""
    from torchdiffeq import odeint

    y0 = torch.cat([y for _, y in starts]).double()
    log_s0 = torch.cat([torch.full((y.shape[0], 1), math.log(s)) for s, y in starts]).double()
    span = math.log(REF_S_END) - log_s0  # per row, negative

    def rhs(tau, y):
        s = torch.exp(log_s0 + span * tau)
        _, eps = mixture.denoise(y, torch.ones_like(s[:, 0]), s[:, 0])
        return span * s * eps

    tau = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y_end = odeint(rhs, y0, tau, rtol=REF_TOL, atol=REF_TOL, method="dopri5")[-1]
    x0, _ = mixture.denoise(y_end, 1.0, REF_S_END)
    return list(x0.split([y.shape[0] for _, y in starts]))


# ---------------------------------------------------------------------------------------------
# runs


@dataclass
class Run:
    side: str  # "ours" | "diffusers"
    family: str
    setting: str
    default: bool
    fn: Callable[[int], tuple[torch.Tensor, int, float, float]]  # steps -> (x0, nfe, s0, y0 scale)
    results: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.side}:{self.family}[{self.setting}]"


def ours_runs(mixture, z: torch.Tensor, seed: int, sigma_max: float) -> list[Run]:
    vp, ve = VPSDE(), VESDE(sigma_min=0.01, sigma_max=sigma_max)
    num = z.shape[0]

    def runner(sde, sampler, **options):
        def fn(steps):
            den = Counted(MixtureModel(mixture, sde))
            noise = sample_noise(seed, range(num))
            noise.randn(z.shape[1:], torch.float64)  # draw 0 is the start noise z, as in `generate`
            x = sde.prior_std() * z
            out = sampler(den, x, steps, noise=noise, **options)
            T = torch.tensor(sde.T, dtype=torch.float64)
            s0, alpha0 = float(sde.noise_ratio(T)), float(sde.alpha(T))
            return out, den.calls, s0, sde.prior_std() / alpha0

        return fn

    R = []
    add = lambda fam, setting, default, fn: R.append(Run("ours", fam, setting, default, fn))
    add("ddpm", "spacing=trailing", True, runner(vp, ddpm, spacing="trailing"))
    add("ddpm", "spacing=leading", False, runner(vp, ddpm, spacing="leading"))
    add("ddim", "spacing=trailing", True, runner(vp, ddim, eta=0.0, spacing="trailing"))
    add("ddim", "spacing=leading", False, runner(vp, ddim, eta=0.0, spacing="leading"))
    add("ddim", "spacing=uniform", False, runner(vp, ddim, eta=0.0, spacing="uniform"))
    for solver in ("euler", "heun", "dpmpp_2m", "rk4"):  # default: spacing=auto (logsnr for dpmpp_2m, else karras)
        add(solver, "spacing=karras", solver != "dpmpp_2m", runner(vp, ode, solver=solver, spacing="karras"))
        if solver != "rk4":
            add(solver, "spacing=trailing", False, runner(vp, ode, solver=solver, spacing="trailing"))
            add(solver, "spacing=uniform", False, runner(vp, ode, solver=solver, spacing="uniform"))
    add("dpmpp_2m", "spacing=logsnr", True, runner(vp, ode, solver="dpmpp_2m", spacing="logsnr"))
    add("pc_ve", "reverse_diffusion+ald snr=0.16", True, runner(ve, pc, predictor="reverse_diffusion", corrector="ald", snr=0.16))
    add("pc_ve", "reverse_diffusion+langevin snr=0.15", False, runner(ve, pc, predictor="reverse_diffusion", corrector="langevin", snr=0.15))
    return R


def _discrete_loop(scheduler, model: ExactModel, z, steps, generator, level_of, **step_kwargs):
    """The DDPM/DDIM/Euler/Heun/DPM-Solver pipelines' loop: x = z * init_noise_sigma; for each
    timestep: scale_model_input, model, step. level_of(scheduler, i, t) -> (alpha, sigma) of the call."""
    scheduler.set_timesteps(steps)
    x = z * float(scheduler.init_noise_sigma)
    x0_start = x
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator
    for i, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(x, t)
        alpha, sigma = level_of(scheduler, i, t)
        _, eps = model(inp, alpha, sigma)
        out = scheduler.step(eps, t, x, **step_kwargs)
        x = out.prev_sample
    return x.double(), x0_start


def level_discrete(scheduler, i, t):  # noqa: ARG001
    """DDPM/DDIM: integer timestep t -> alphas_cumprod[t]."""
    ac = float(scheduler.alphas_cumprod[int(t)])
    return math.sqrt(ac), math.sqrt(1.0 - ac)


def level_sigma(scheduler, i, t):
    """Euler/Heun (after scale_model_input set the step index) and DPM-Solver (the i-th sigma):
    the scheduler's s = sigma/alpha -> alpha = 1/sqrt(1+s^2), sigma = s alpha."""
    idx = scheduler.step_index if scheduler.step_index is not None else i
    s = float(scheduler.sigmas[idx])
    alpha = 1.0 / math.sqrt(1.0 + s * s)
    return alpha, s * alpha


def diffusers_runs(mixture, z: torch.Tensor, seed: int, sigma_max: float) -> list[Run]:
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        ScoreSdeVeScheduler,
    )

    def discrete(cls, level_of, state, **config):
        """state: 'x' (VP sample, scale 1/alpha to y) or 'y' (Karras-style sample, already y)."""

        def fn(steps):
            sched = cls(**DDPM_SCHEDULE, **config)
            model = ExactModel(mixture)
            gen = torch.Generator().manual_seed(seed + 1)
            out, x_start = _discrete_loop(sched, model, z, steps, gen, level_of)
            # the reference starts from this run's own initial sample placed at the top of the
            # 1000-step schedule (t = 999), where the prior noise belongs: a schedule that starts
            # lower (timestep_spacing=leading) pays for it
            ac = float(sched.alphas_cumprod[-1])
            s0 = math.sqrt((1 - ac) / ac)
            scale = float(sched.init_noise_sigma) * (1.0 / math.sqrt(ac) if state == "x" else 1.0)
            return out, model.calls, s0, scale

        return fn

    def score_sde_ve(**config):
        def fn(steps):
            sched = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=sigma_max, **config)
            model = ExactModel(mixture)
            gen = torch.Generator().manual_seed(seed + 1)
            sched.set_timesteps(steps)
            sched.set_sigmas(steps)
            x = z * float(sched.init_noise_sigma)
            mean = x
            for i, t in enumerate(sched.timesteps):
                sigma_t = float(sched.sigmas[i])
                for _ in range(sched.config.correct_steps):
                    _, eps = model(x, 1.0, sigma_t)
                    x = sched.step_correct(-eps / sigma_t, x, generator=gen).prev_sample
                _, eps = model(x, 1.0, sigma_t)
                out = sched.step_pred(-eps / sigma_t, t, x, generator=gen)
                x, mean = out.prev_sample, out.prev_sample_mean
            return mean.double(), model.calls, sigma_max, sigma_max

        return fn

    no_clip = {"clip_sample": False}
    R = []
    add = lambda fam, setting, default, fn: R.append(Run("diffusers", fam, setting, default, fn))
    for spacing in ("leading", "trailing"):
        add("ddpm", f"timestep_spacing={spacing}", spacing == "leading", discrete(DDPMScheduler, level_discrete, "x", timestep_spacing=spacing, **no_clip))
    for spacing in ("leading", "trailing"):
        add("ddim", f"timestep_spacing={spacing}", spacing == "leading", discrete(DDIMScheduler, level_discrete, "x", timestep_spacing=spacing, **no_clip))
    for fam, cls in (("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler)):
        add(fam, "timestep_spacing=linspace", True, discrete(cls, level_sigma, "y"))
        add(fam, "use_karras_sigmas", False, discrete(cls, level_sigma, "y", use_karras_sigmas=True))
        add(fam, "timestep_spacing=trailing", False, discrete(cls, level_sigma, "y", timestep_spacing="trailing"))
    add("dpmpp_2m", "timestep_spacing=linspace", True, discrete(DPMSolverMultistepScheduler, level_sigma, "x"))
    add("dpmpp_2m", "use_karras_sigmas", False, discrete(DPMSolverMultistepScheduler, level_sigma, "x", use_karras_sigmas=True))
    add("dpmpp_2m", "use_lu_lambdas", False, discrete(DPMSolverMultistepScheduler, level_sigma, "x", use_lu_lambdas=True))
    add("pc_ve", "snr=0.15 correct_steps=1", True, score_sde_ve())
    return R


# ---------------------------------------------------------------------------------------------
# the benchmark


def run_benchmark(args) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    mixture = make_mixture(args.dim, args.components, args.seed, args.mean_scale, args.narrow_std)
    g = torch.Generator().manual_seed(20_000 + args.seed)
    exact = mixture.sample(args.num, g)[0]
    dirs = random_directions(args.dim, args.directions, args.seed)
    floors = [float(sliced_wasserstein(mixture.sample(args.num, g)[0], exact, dirs)) for _ in range(args.floor_repeats)]
    floor = sum(floors) / len(floors)
    floor_sd = (sum((f - floor) ** 2 for f in floors) / max(len(floors) - 1, 1)) ** 0.5
    # VE sigma_max: Song & Ermon's technique 1, the largest pairwise distance of the data.
    sigma_max = args.sigma_max or float(torch.cdist(exact[:2000], exact[:2000]).max())

    z = sample_noise(args.seed, range(args.num)).randn((args.dim,), torch.float64)  # `generate`'s start noise
    runs = ours_runs(mixture, z, args.seed, sigma_max) + diffusers_runs(mixture, z, args.seed, sigma_max)
    if args.only:
        runs = [r for r in runs if r.family in args.only]

    starts: dict[tuple[float, float], int] = {}
    outputs = []
    for run in runs:
        fam = FAMILIES[run.family]
        for target in args.nfe:
            steps = fam["steps"](target)
            if steps < 1 or (run.side == "diffusers" and steps > 1000):
                continue
            if not run.default and target > args.variants_max_nfe:
                continue
            t0 = time.perf_counter()
            x, calls, s0, scale = run.fn(steps)
            seconds = time.perf_counter() - t0
            if calls != fam["nfe"](steps):
                raise RuntimeError(f"{run.label}: {calls} evaluations for {steps} steps, expected {fam['nfe'](steps)}")
            res = {"target_nfe": target, "nfe": calls, "steps": steps, "seconds": round(seconds, 3),
                   "sw2": float(sliced_wasserstein(x, exact, dirs))}
            if fam["deterministic"]:
                key = (s0, scale)
                res["reference_start"] = {"sigma_over_alpha": s0, "y0_over_z": scale}
                starts.setdefault(key, len(starts))
                outputs.append((res, key, x))
            run.results.append(res)
            if args.verbose:
                print(f"  {run.label:60s} nfe={calls:5d} sw2={res['sw2']:.4g} ({seconds:.2f}s)", flush=True)

    t0 = time.perf_counter()
    keys = sorted(starts, key=starts.get)
    refs = dict(zip(keys, reference_endpoints(mixture, [(s0, scale * z) for s0, scale in keys]))) if keys else {}
    ref_seconds = time.perf_counter() - t0
    for res, key, x in outputs:
        res["endpoint"] = float((x - refs[key]).pow(2).mean().sqrt())

    pairs = compare(runs, args.nfe, floor, floor_sd)
    return {
        "config": {
            "dim": args.dim, "components": args.components, "num": args.num, "nfe": list(args.nfe), "seed": args.seed,
            "mean_scale": args.mean_scale, "narrow_std": args.narrow_std, "directions": args.directions, "floor_repeats": args.floor_repeats,
            "vp": "continuous VP beta 0.1..20 (ours) / DDPM linear betas 1e-4..0.02, 1000 steps (diffusers)",
            "ve": {"sigma_min": 0.01, "sigma_max": sigma_max},
            "reference": {"solver": "dopri5 (torchdiffeq)", "rtol": REF_TOL, "atol": REF_TOL, "s_end": REF_S_END,
                          "starts": len(keys), "seconds": round(ref_seconds, 2)},
            "versions": environment(),
        },
        "mixture": {"means": mixture.means.tolist(), "stds": mixture.variances[:, 0].sqrt().tolist(),
                    "weights": mixture.weights.tolist()},
        "floor": {"sw2": floor, "sd": floor_sd, "values": floors},
        "runs": [{"side": r.side, "family": r.family, "setting": r.setting, "default": r.default,
                  "deterministic": FAMILIES[r.family]["deterministic"], "results": r.results} for r in runs],
        "pairs": pairs,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }


def compare(runs: list[Run], nfe_list, floor: float, floor_sd: float) -> list[dict]:
    """Per family with both sides: ours vs diffusers at each target NFE, defaults vs defaults and
    best vs best (the lowest error among each side's listed settings at that NFE)."""
    pairs = []
    for fam, (ours_name, theirs_name) in PAIR_NAMES.items():
        ours = [r for r in runs if r.family == fam and r.side == "ours"]
        theirs = [r for r in runs if r.family == fam and r.side == "diffusers"]
        if not ours or not theirs:
            continue
        metric = "endpoint" if FAMILIES[fam]["deterministic"] else "sw2"
        for kind in ("default", "best"):
            rows = []
            for target in nfe_list:
                def pick(side_runs):
                    cands = [(res[metric], r.setting, res) for r in side_runs if (kind == "best" or r.default)
                             for res in r.results if res["target_nfe"] == target]
                    return min(cands, key=lambda c: c[0]) if cands else None

                a, b = pick(ours), pick(theirs)
                if a is None or b is None:
                    continue
                ratio = a[0] / b[0] if b[0] > 0 else math.inf
                if math.isnan(a[0]) or math.isnan(b[0]):  # a sampler that returned NaN loses
                    verdict = "loss" if math.isnan(a[0]) else "win"
                elif metric == "sw2" and (abs(a[0] - b[0]) <= 2 * floor_sd or max(a[0], b[0]) <= floor + 2 * floor_sd):
                    verdict = "tie"  # within noise, or both as close to the exact samples as another exact set is
                elif metric == "endpoint" and abs(math.log(ratio)) <= math.log(1 + SCHEDULE_TOLERANCE):
                    verdict = "tie"  # within what the two schedules alone change (see SCHEDULE_TOLERANCE)
                else:
                    verdict = "win" if a[0] <= b[0] else "loss"
                rows.append({"target_nfe": target, "nfe": a[2]["nfe"], "ours": a[0], "theirs": b[0], "ratio": ratio,
                             "verdict": verdict, "ours_setting": a[1], "theirs_setting": b[1]})
            pairs.append({"family": fam, "ours": ours_name, "theirs": theirs_name, "kind": kind, "metric": metric, "rows": rows})
    return pairs


def rescore(path: Path) -> dict:
    """An earlier report with its pairs recomputed by the current `compare`."""
    report = json.loads(Path(path).read_text())
    runs = [Run(r["side"], r["family"], r["setting"], r["default"], None, r["results"])
            for r in report["runs"]]
    report["pairs"] = compare(runs, report["config"]["nfe"], report["floor"]["sw2"], report["floor"]["sd"])
    report["rescored_from"] = str(path)
    return report


# ---------------------------------------------------------------------------------------------
# output


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def print_tables(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(width=200)
    nfe = report["config"]["nfe"]
    floor = report["floor"]
    for metric, title in (
        ("endpoint", "endpoint RMS error vs the exact PF-ODE solve from the same start noise (deterministic samplers)"),
        ("sw2", f"sliced W2 to exact samples (floor between two exact sets: {floor['sw2']:.4f} ± {floor['sd']:.4f})"),
    ):
        table = Table(title=title, title_justify="left")
        table.add_column("side")
        table.add_column("sampler")
        table.add_column("setting")
        for e in nfe:
            table.add_column(f"NFE {e}", justify="right")
        for run in report["runs"]:
            if metric == "endpoint" and not run["deterministic"]:
                continue
            by = {r["target_nfe"]: r for r in run["results"]}
            cells = []
            for e in nfe:
                r = by.get(e)
                cell = _fmt(r.get(metric)) if r else "-"
                if r and r["nfe"] != e:
                    cell += f" ({r['nfe']})"
                cells.append(cell)
            style = None if run["side"] == "ours" else "dim"
            name = PAIR_NAMES.get(run["family"], (run["family"],))[0 if run["side"] == "ours" else 1] if run["family"] in PAIR_NAMES else f"ode {run['family']}"
            mark = " *" if run["default"] else ""
            table.add_row(run["side"], name, run["setting"] + mark, *cells, style=style)
        console.print(table)
    console.print("* = the sampler's default setting (non-default settings run up to --variants-max-nfe); "
                  "(n) = the NFE actually spent where the target is not reachable (Heun: 2n-1, RK4: 4n-3, PC: 2n)")

    table = Table(title="ours / diffusers at equal NFE (win ✓: ratio <= 1 or diffusers NaN; tie ≈: sw2 differs by <= 2 floor sd "
                        "or both <= floor + 2 sd, or endpoint ratio within SCHEDULE_TOLERANCE = 1%)", title_justify="left")
    table.add_column("pair")
    table.add_column("settings")
    table.add_column("metric")
    for e in nfe:
        table.add_column(f"NFE {e}", justify="right")
    for pair in report["pairs"]:
        by = {r["target_nfe"]: r for r in pair["rows"]}
        cells = []
        for e in nfe:
            r = by.get(e)
            if r is None:
                cells.append("-")
                continue
            mark = {"win": "[green]✓[/green]", "tie": "[yellow]≈[/yellow]", "loss": "[red]✗[/red]"}[r["verdict"]]
            cells.append(f"{r['ratio']:.3f} {mark}")
        table.add_row(f"{pair['ours']} ~ {pair['theirs']}", pair["kind"], pair["metric"], *cells)
    console.print(table)
    losses = [(p["family"], p["kind"], r) for p in report["pairs"] for r in p["rows"] if r["verdict"] == "loss"]
    for fam, kind, r in losses:
        console.print(escape(f"loss: {fam} ({kind}) at NFE {r['nfe']}: ours {r['ours']:.3e} [{r['ours_setting']}] vs diffusers "
                             f"{r['theirs']:.3e} [{r['theirs_setting']}]"))
    console.print(f"{len(losses)} losses out of {sum(len(p['rows']) for p in report['pairs'])} comparisons; wall time {report['wall_seconds']:.0f} s")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {f: c for f, c in zip(FAMILIES, plt.rcParams["axes.prop_cycle"].by_key()["color"])}
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, metric in zip(axes, ("endpoint", "sw2")):
        for run in report["runs"]:
            pts = [(r["nfe"], r[metric]) for r in run["results"] if metric in r and r[metric] > 0]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, linestyle="-" if run["side"] == "ours" else "--", color=colors[run["family"]],
                    marker="o" if run["default"] else ".", alpha=1.0 if run["default"] else 0.45,
                    label=f"{run['side']} {run['family']} [{run['setting']}]")
        if metric == "sw2":
            ax.axhline(report["floor"]["sw2"], color="gray", linewidth=1, label="exact-vs-exact floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel({"endpoint": "endpoint RMS error vs exact ODE", "sw2": "sliced W2 to exact samples"}[metric])
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=6, loc="upper right", ncol=1)
    c = report["config"]
    fig.suptitle(f"diffctl (solid) vs diffusers (dashed): GMM dim={c['dim']} K={c['components']} N={c['num']} seed={c['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=8, help="data dimension (default 8)")
    p.add_argument("--components", type=int, default=8, help="mixture components (default 8)")
    p.add_argument("--mean-scale", type=float, default=1.0, help="component means ~ N(0, mean_scale^2 I) (default 1)")
    p.add_argument("--narrow-std", type=float, default=0.04,
                   help="std of the first component (default 0.04: a narrow one, which showed DPM-Solver++'s last step "
                        "on uneven levels and the karras range, issue 13 item 9); 0: stds all uniform in [0.1, 0.5] as before")
    p.add_argument("--num", type=int, default=1000, help="samples per run (default 1000)")
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=list(DEFAULT_NFE),
                   help="comma-separated target NFE list (default 5,10,20,50,100,1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--directions", type=int, default=256, help="sliced-W2 projections (default 256)")
    p.add_argument("--floor-repeats", type=int, default=8, help="exact-vs-exact pairs for the SW2 floor and its spread")
    p.add_argument("--sigma-max", type=float, default=None, help="VE sigma_max (default: largest pairwise data distance)")
    p.add_argument("--variants-max-nfe", type=int, default=1000,
                   help="run the non-default settings only up to this NFE (default 1000: all)")
    p.add_argument("--only", type=lambda s: s.split(","), default=None, help="families to run, e.g. ddim,heun")
    p.add_argument("--out", type=Path, default=None, help="output directory (default outputs/bench/<timestamp>); must not exist")
    p.add_argument("--verbose", action="store_true", help="print each run as it finishes")
    p.add_argument("--rescore", type=Path, default=None,
                   help="recompute the comparison, tables and plot from an earlier run's bench.json (no sampling)")
    args = p.parse_args(argv)
    if min(args.nfe) < 1:
        p.error("--nfe values must be >= 1")
    out = args.out or Path("outputs/bench") / _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if out.exists() and any(out.iterdir()):
        p.error(f"{out} exists and is not empty; results are never overwritten")
    report = rescore(args.rescore) if args.rescore else run_benchmark(args)
    out.mkdir(parents=True, exist_ok=True)
    report["command"] = " ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "bench.png")
    print_tables(report)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
