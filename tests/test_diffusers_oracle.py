"""diffusers' schedulers as an independent oracle for our update rules, on a shared noise schedule.

A `DiscreteVP` SDE reproduces diffusers' 1000-step DDPM schedule (alphas_cumprod) at the times
t = (timestep + 1) / 1000, so our samplers with spacing=trailing visit exactly the timesteps of
diffusers' timestep_spacing="trailing" and both sides can be driven by the same exact model and
the same noise. Also: the benchmark's timestep -> (alpha, sigma) mapping for every scheduler, and a
smoke run of scripts/bench_samplers.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    ScoreSdeVeScheduler,
)

from diffctl.networks.gmm import GaussianMixture, MixtureModel  # noqa: E402
from diffctl.samplers import ddim, ode  # noqa: E402
from diffctl.noise import SampleNoise  # noqa: E402
from diffctl.samplers.common import posterior  # noqa: E402
from diffctl.sde import SDE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_samplers as bench  # noqa: E402

B, D = 64, 3


class DiscreteVP(SDE):
    """alpha(t)^2 = alphas_cumprod[1000 t - 1] of a diffusers scheduler (log-linear in between), so a
    level at t = (k + 1)/1000 is diffusers' timestep k exactly."""

    name = "discrete_vp"

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__(eps=1e-3)
        self.log_ac = alphas_cumprod.double().log()

    def _log_ac(self, t):
        pos = (torch.as_tensor(t, dtype=torch.float64) * len(self.log_ac) - 1).clamp(0, len(self.log_ac) - 1)
        lo = pos.floor().long().clamp(max=len(self.log_ac) - 2)
        frac = pos - lo
        return self.log_ac[lo] * (1 - frac) + self.log_ac[lo + 1] * frac

    def alpha(self, t):
        return torch.exp(0.5 * self._log_ac(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(self._log_ac(t)))

    def drift(self, x, t):  # pragma: no cover - not used by the samplers tested here
        raise NotImplementedError

    def diffusion(self, t):  # pragma: no cover
        raise NotImplementedError


def _mixture():
    g = torch.Generator().manual_seed(3)
    return GaussianMixture(torch.randn(3, D, generator=g, dtype=torch.float64), scales=[0.2, 0.4, 0.3])


def _levels(alpha: float, sigma: float):
    class L:  # a Level at given (alpha, sigma)
        pass

    lv = L()
    lv.alpha, lv.sigma, lv.s = alpha, sigma, sigma / alpha
    return lv


def _discrete_level(sched, t):
    if t < 0:
        return _levels(1.0, 0.0)
    ac = float(sched.alphas_cumprod[int(t)])
    return _levels(math.sqrt(ac), math.sqrt(1 - ac))


# --------------------------------------------------------------------------- single steps


def test_ddpm_posterior_equals_ddpm_scheduler_step():
    """Our DDPM posterior mean and std (variance beta-tilde), moved to x = alpha y, reproduce
    DDPMScheduler.step (fixed_small) for every step of a 10-step schedule, the last one to x0."""
    sched = DDPMScheduler(clip_sample=False)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    eps = torch.randn(B, D, generator=g, dtype=torch.float64)
    ts = [int(t) for t in sched.timesteps]
    for t, prev in zip(ts, ts[1:] + [-1]):
        now, nxt = _discrete_level(sched, t), _discrete_level(sched, prev)
        x0 = (x - now.sigma * eps) / now.alpha
        mean, std = posterior(x / now.alpha, x0, now, nxt)
        noise = torch.randn(B, D, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        ours = nxt.alpha * (mean + (std * noise if t > 0 else 0.0))
        theirs = sched.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_sampler_equals_ddim_scheduler(eta, spacing):
    """Our whole DDIM sampler on diffusers' schedule equals DDIMScheduler with the same timestep
    spacing, driven by the same exact model and, for eta > 0, the same noise: this checks the
    x0/eps directions and the eta-scaled variance at every step, and for `leading` (which starts
    below T) that the prior draw is taken as the sample at the first timestep, as diffusers does."""
    sched = DDIMScheduler(clip_sample=False, timestep_spacing=spacing)
    mixture, steps = _mixture(), 10
    sde = DiscreteVP(sched.alphas_cumprod)
    z = SampleNoise(1, range(B)).randn((D,), torch.float64)
    gens = SampleNoise(1, range(B))
    gens.randn((D,), torch.float64)
    ours = ddim(MixtureModel(mixture, sde), z, steps, noise=gens, eta=eta, spacing=spacing)

    replay = SampleNoise(1, range(B))
    replay.randn((D,), torch.float64)
    sched.set_timesteps(steps)
    model = bench.ExactModel(mixture)
    x = z.clone()
    for i, t in enumerate(sched.timesteps):
        _, eps = model(x, *bench.level_discrete(sched, i, t))
        last = i == len(sched.timesteps) - 1
        noise = torch.zeros_like(x) if (last or eta == 0) else replay.randn((D,), torch.float64)
        x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    assert model.calls == steps
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    if eta > 0:  # the noise matters: a different stream must not agree
        other = ddim(MixtureModel(mixture, sde), z, steps, noise=SampleNoise(9, range(B)), eta=eta, spacing=spacing)
        assert (other - x).abs().max() > 1e-2


def _drive(sched, mixture, y_or_x, steps, level_of):
    sched.set_timesteps(steps)
    model = bench.ExactModel(mixture)
    x = y_or_x
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        _, eps = model(inp, *level_of(sched, i, t))
        x = sched.step(eps, t, x).prev_sample
    return x.double(), model.calls


@pytest.mark.parametrize("solver,cls", [("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler)])
def test_euler_heun_in_y_s_equal_karras_schedulers(solver, cls):
    """Our Euler / Heun steps in y = x/alpha, s = sigma/alpha (spacing=trailing, last step an Euler
    step to s = 0) equal EulerDiscreteScheduler / HeunDiscreteScheduler (timestep_spacing=trailing),
    including Heun's NFE = 2N - 1."""
    sched = cls(timestep_spacing="trailing")
    mixture, steps = _mixture(), 8
    sde = DiscreteVP(sched.alphas_cumprod)
    z = SampleNoise(2, range(B)).randn((D,), torch.float64)
    sched.set_timesteps(steps)
    s_max = float(sched.init_noise_sigma)
    alpha_T = float(sde.alpha(torch.tensor(1.0)))
    den = bench.Counted(MixtureModel(mixture, sde))
    ours = ode(den, z * s_max * alpha_T, steps, solver=solver, spacing="trailing")  # the same y0 = z * s_max
    theirs, calls = _drive(cls(timestep_spacing="trailing"), mixture, z * s_max, steps, bench.level_sigma)
    assert den.calls == calls == bench.FAMILIES[solver]["nfe"](steps)
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)


def test_dpmpp_2m_equals_dpm_solver_multistep():
    """Our DPM-Solver++(2M) equals DPMSolverMultistepScheduler (dpmsolver++, midpoint, order 2,
    final step first order to sigma = 0) given the same (alpha, sigma) sequence. Its step to 0 is
    our x0 prediction at the last level; the step before stays second order on both sides, ours
    with lower_order_final on: trailing levels end with r = h_prev/h >= 0.6, above its 1/2 threshold."""
    cfg = dict(timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    mixture = _mixture()
    for steps in (4, 10, 20):  # divisors of 1000 (exact trailing timesteps); also past lower_order_final's 15-step threshold
        sde = DiscreteVP(DPMSolverMultistepScheduler(**cfg).alphas_cumprod)
        z = SampleNoise(4, range(B)).randn((D,), torch.float64)
        ours = ode(MixtureModel(mixture, sde), z, steps, solver="dpmpp_2m", spacing="trailing")
        theirs, calls = _drive(DPMSolverMultistepScheduler(**cfg), mixture, z, steps, bench.level_sigma)
        assert calls == steps
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("steps", [9, 27])  # below and above diffusers' 15-step lower_order_final threshold
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpmpp_2m_lower_order_final_equals_dpm_solver_multistep(steps, lower_order_final):
    """The step to the last level, at first order or not, against DPMSolverMultistepScheduler with
    final_sigmas_type="sigma_min" (its last step ends at timestep 0's sigma, our last level t = 1e-3)
    and timestep_spacing="linspace": its timesteps round(999 (N - i)/N) are our spacing=uniform
    levels exactly when N divides 999 (9, 27). Their last step is over twice the one before
    (r ~ 0.2), so ours lowers it at both N; diffusers lowers it for N < 15 with lower_order_final,
    at any N with euler_at_final. Its result is a sample at sigma_min, which the exact model's x0
    there turns into our output (our last evaluation). The two variants differ by far more than
    the tolerance here (asserted), so each side must take the branch the other takes."""
    mixture = _mixture()
    cfg = dict(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="sigma_min", timestep_spacing="linspace",
               lower_order_final=lower_order_final, euler_at_final=lower_order_final and steps >= 15)
    sde = DiscreteVP(DPMSolverMultistepScheduler(**cfg).alphas_cumprod)
    z = SampleNoise(7, range(B)).randn((D,), torch.float64)
    den = bench.Counted(MixtureModel(mixture, sde))
    ours = ode(den, z, steps + 1, solver="dpmpp_2m", spacing="uniform", lower_order_final=lower_order_final)
    x_end, calls = _drive(DPMSolverMultistepScheduler(**cfg), mixture, z, steps, bench.level_sigma)
    last = _discrete_level(DPMSolverMultistepScheduler(**cfg), 0)
    theirs, _ = bench.ExactModel(mixture)(x_end, last.alpha, last.sigma)
    assert den.calls == calls + 1 == steps + 1
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)
    other = ode(MixtureModel(mixture, sde), z, steps + 1, solver="dpmpp_2m", spacing="uniform", lower_order_final=not lower_order_final)
    assert (other - theirs).abs().max() > 1e-3


# --------------------------------------------------------------------------- the benchmark's mapping


def _mapping_error(sched, steps, level_of, mixture, z):
    """Max |scheduler's own x0 - model's x0| over all steps: zero iff (alpha, sigma) given to the
    model is the level the scheduler's update assumes."""
    sched.set_timesteps(steps)
    model = bench.ExactModel(mixture)
    x = z * float(sched.init_noise_sigma)
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        _, eps = model(inp, *level_of(sched, i, t))
        out = sched.step(eps, t, x)
        x0 = sched.model_outputs[-1] if isinstance(sched, DPMSolverMultistepScheduler) else out.pred_original_sample
        worst = max(worst, float((x0.double() - model.last_x0).abs().max()))
        x = out.prev_sample
    return worst


CONFIGS = [
    (DDPMScheduler, dict(clip_sample=False)),
    (DDPMScheduler, dict(clip_sample=False, timestep_spacing="trailing")),
    (DDIMScheduler, dict(clip_sample=False)),
    (DDIMScheduler, dict(clip_sample=False, timestep_spacing="trailing")),
    (EulerDiscreteScheduler, dict()),
    (EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
    (EulerDiscreteScheduler, dict(timestep_spacing="trailing")),
    (HeunDiscreteScheduler, dict()),
    (HeunDiscreteScheduler, dict(use_karras_sigmas=True)),
    (DPMSolverMultistepScheduler, dict()),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    (DPMSolverMultistepScheduler, dict(use_lu_lambdas=True)),
]


@pytest.mark.parametrize("cls,cfg", CONFIGS, ids=[f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in cfg.items())}" for c, cfg in CONFIGS])
def test_benchmark_level_mapping(cls, cfg):
    """The benchmark's timestep -> (alpha, sigma) for each scheduler: the scheduler's own x0 from
    our eps equals the exact model's x0 at every step (float32 schedule tolerance), and a mapping
    one timestep off is caught."""
    mixture = _mixture()
    z = SampleNoise(5, range(B)).randn((D,), torch.float64)
    level_of = bench.level_discrete if cls in (DDPMScheduler, DDIMScheduler) else bench.level_sigma
    for steps in (5, 20):
        assert _mapping_error(cls(**cfg), steps, level_of, mixture, z) < 1e-4

    if cls in (DDPMScheduler, DDIMScheduler):
        wrong = lambda sched, i, t: bench.level_discrete(sched, i, min(int(t) + 20, 999))
    else:
        def wrong(sched, i, t):
            a, s = level_of(sched, i, t)
            return a, s * 1.05
    assert _mapping_error(cls(**cfg), 20, wrong, mixture, z) > 1e-3


def test_score_sde_ve_sigmas_are_the_pipeline_sigmas():
    """ScoreSdeVe: the model is called at sigmas[i] (alpha = 1) and step_pred moves with
    discrete_sigmas; both must be the same levels for the exact score to be the one the step uses,
    and the last predictor step's mean is Tweedie's x0 = x + sigma_min^2 score."""
    for steps in (3, 10, 250):
        sched = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=7.0)
        sched.set_timesteps(steps)
        sched.set_sigmas(steps)
        idx = [int((t * torch.ones(1) * (steps - 1)).long()) for t in sched.timesteps]
        torch.testing.assert_close(sched.discrete_sigmas[idx].double(), sched.sigmas.double(), rtol=1e-4, atol=0)
    mixture = _mixture()
    x = SampleNoise(6, range(B)).randn((D,), torch.float64)
    x0, eps = bench.ExactModel(mixture)(x, 1.0, float(sched.sigmas[-1]))
    mean = sched.step_pred(-eps / float(sched.sigmas[-1]), sched.timesteps[-1], x).prev_sample_mean
    torch.testing.assert_close(mean.double(), x0, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the script


def test_bench_script_smoke(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_samplers.py"), "--dim", "2", "--components", "2", "--num", "48",
           "--nfe", "4,8", "--directions", "16", "--floor-repeats", "2", "--variants-max-nfe", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours / diffusers" in proc.stdout
    assert (out / "bench.png").stat().st_size > 1000
    report = json.loads((out / "bench.json").read_text())
    assert {"config", "mixture", "floor", "runs", "pairs", "wall_seconds", "command"} <= set(report)
    assert report["floor"]["sw2"] > 0 and len(report["floor"]["values"]) == 2
    sides = {(r["side"], r["family"]) for r in report["runs"]}
    for fam in bench.PAIR_NAMES:
        assert ("ours", fam) in sides and ("diffusers", fam) in sides
    for run in report["runs"]:
        for res in run["results"]:
            assert res["nfe"] == bench.FAMILIES[run["family"]]["nfe"](res["steps"])
            assert res["sw2"] > 0 and ("endpoint" in res) == run["deterministic"]
        if not run["default"]:
            assert all(res["target_nfe"] <= 4 for res in run["results"])
    assert {p["family"] for p in report["pairs"]} == set(bench.PAIR_NAMES)
    for pair in report["pairs"]:
        assert pair["metric"] == ("endpoint" if bench.FAMILIES[pair["family"]]["deterministic"] else "sw2")
        assert pair["rows"], pair
        for row in pair["rows"]:
            assert row["ratio"] == pytest.approx(row["ours"] / row["theirs"])
            assert row["verdict"] in ("win", "tie", "loss")
    # results are never overwritten
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode != 0 and "never overwritten" in again.stderr
