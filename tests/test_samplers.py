"""Samplers against an exact model: data x0 ~ N(m, c^2 I), whose denoiser, probability-flow ODE
solution and sample distribution are all closed-form under every SDE. The ODE solvers' orders and
the DDIM/DDPM identities are tested against the multi-modal Gaussian mixture in test_ground_truth.py."""

import math

import numpy as np
import pytest
import torch

from diffctl.denoiser import ClippedModel, GuidedModel, Prediction, compose
from diffctl.errors import ConfigError
from diffctl.noise import SampleNoise
from diffctl.samplers import check_sampler, generate, noise_levels, sampler_options
from diffctl.samplers.common import Level, ratio_levels
from diffctl.samplers.ode import ode
from diffctl.samplers.pc import CORRECTORS
from diffctl.sde import LinearSDE, SubVPSDE, VESDE, VPSDE, broadcast

SDES = {"vp": VPSDE(), "vpsub": SubVPSDE(), "ve": VESDE(sigma_max=20.0), "linear": LinearSDE()}
M, C = 0.5, 0.3


class ExactGaussian:
    """E[x0 | x_t] for x0 ~ N(M, C^2): M + alpha C^2 / (alpha^2 C^2 + sigma^2) (x_t - alpha M)."""

    def __init__(self, sde):
        self.sde, self.calls = sde, 0

    def __call__(self, x, t, cond=None):
        self.calls += 1
        t = t.double()
        a, s = broadcast(self.sde.alpha(t), x), broadcast(self.sde.sigma(t), x)
        x0 = M + a * C**2 / (a * a * C**2 + s * s) * (x.double() - a * M)
        eps = (x.double() - a * x0) / s
        return Prediction(x0=x0.to(x.dtype), eps=eps.to(x.dtype), sigma=s.to(x.dtype))


def _start(sde, n, dim, seed=0, dtype=torch.float64):
    noise = SampleNoise(seed, range(n))
    return sde.prior_std() * noise.randn((dim,), dtype), noise


def _exact_ode_x0(sde, x_T):
    """The PF-ODE in y = x/alpha, s = sigma/alpha moves y - M by the factor sqrt(C^2 + s^2): the exact
    end point at s(eps), then the x0 prediction there (what every solver returns)."""
    level = lambda t: (float(sde.alpha(torch.tensor(t, dtype=torch.float64))), float(sde.noise_ratio(torch.tensor(t, dtype=torch.float64))))
    a_T, s_T = level(sde.T)
    _, s_0 = level(sde.sample_eps)
    y = M + (x_T / a_T - M) * math.sqrt(C**2 + s_0**2) / math.sqrt(C**2 + s_T**2)
    return M + C**2 / (C**2 + s_0**2) * (y - M)


@pytest.mark.parametrize("spacing", ["uniform", "trailing", "karras", "logsnr"])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_noise_levels_start_at_T_and_decrease(sde_name, spacing):
    sde = SDES[sde_name]
    t = noise_levels(sde, 10, spacing)
    assert t.shape == (10,) and t[0] == sde.T and bool((t[1:] < t[:-1]).all())
    assert t[-1] == (sde.T / 10 if spacing == "trailing" else sde.sample_eps)
    s = sde.noise_ratio(t)
    if spacing == "karras":  # EDM: s^(1/7) evenly spaced
        torch.testing.assert_close(s ** (1 / 7), torch.linspace(float(s[0]) ** (1 / 7), float(s[-1]) ** (1 / 7), 10, dtype=torch.float64))
    if spacing == "logsnr":
        torch.testing.assert_close(s.log(), torch.linspace(math.log(s[0]), math.log(s[-1]), 10, dtype=torch.float64))
    if spacing == "uniform":
        torch.testing.assert_close(t, torch.linspace(sde.T, sde.sample_eps, 10, dtype=torch.float64))
    assert noise_levels(sde, 1, spacing).tolist() == [sde.T]


def _ddim_timesteps(skip_type, num_steps, num_timesteps=1000):
    """DDIM's timestep sequences as its runners/diffusion.py `sample_image` builds them (ermongroup/ddim),
    written out here: "uniform" is range(0, T, T // S), "quad" is int() of linspace(0, sqrt(0.8 T), S)^2."""
    if skip_type == "uniform":
        return list(range(0, num_timesteps, num_timesteps // num_steps))
    return [int(v) for v in np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2]


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 16, 20, 25, 50, 51, 100, 101, 200, 1000])
def test_leading_and_quadratic_are_ddim_uniform_and_quad_grids(steps):
    """At t_end = 1e-3 (VP's sample_eps) DDPM timestep i is t = (i + 1)/1000 (DDPM's own time, see
    sde.ddpm_betas): `leading` is then DDIM's skip_type=uniform and `quadratic` its skip_type=quad
    (each distinct timestep once: DDIM's repeats are steps that do not move), largest first. At 16, 51
    and 101 steps DDIM's float arithmetic puts some timesteps one below the exact floor(0.8 T k^2 / (S-1)^2)
    (31 for 32 at 16 steps): the grid is DDIM's code's, which its experiments ran."""
    sde = SDES["vp"]
    pairs = (("leading", "uniform"), ("quadratic", "quad")) if 1000 % steps == 0 else (("quadratic", "quad"),)
    for ours, theirs in pairs:  # leading at other steps: the next test
        expected = (torch.tensor(sorted(set(_ddim_timesteps(theirs, steps)), reverse=True), dtype=torch.float64) + 1) / 1000
        torch.testing.assert_close(noise_levels(sde, steps, ours), expected, rtol=0, atol=1e-12)
    assert float(noise_levels(sde, steps, "quadratic")[0]) == pytest.approx(1e-3 + 0.8 * (steps > 1), abs=1e-3)


def test_leading_steps_that_do_not_divide_1000_follow_diffusers():
    """Where steps does not divide 1000, DDIM's range(0, 1000, 1000 // steps) has more than `steps`
    timesteps (31 for 30); `leading` keeps `steps` of them, diffusers' timestep_spacing="leading"."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(timestep_spacing="leading")
    sde = SDES["ve"]  # any t_end: timestep i lies at t_end + (T - t_end) i / 999
    for steps in (3, 7, 30, 333):
        sched.set_timesteps(steps)
        expected = sde.sample_eps + (sde.T - sde.sample_eps) * sched.timesteps.double() / 999
        torch.testing.assert_close(noise_levels(sde, steps, "leading"), expected, rtol=0, atol=1e-12)
        assert len(_ddim_timesteps("uniform", steps)) >= steps
    assert len(_ddim_timesteps("uniform", 30)) == 31


@pytest.mark.parametrize("sde_name", list(SDES))
def test_leading_spacing_is_ddim_original_grid(sde_name):
    """DDIM's timesteps 0, c, 2c, ..., (N-1)c of 1000 at t = (k+1)/1000 when t_end = 1e-3; for another
    t_end the 1000 timesteps lie evenly on [t_end, T]: the grid starts one interval below T, ends at t_end."""
    sde = SDES[sde_name]
    t = noise_levels(sde, 10, "leading", t_end=1e-3)
    if sde.T == 1.0:
        torch.testing.assert_close(t, (torch.arange(900, -1, -100, dtype=torch.float64) + 1) / 1000)
    torch.testing.assert_close(t, 1e-3 + (sde.T - 1e-3) * torch.arange(900, -1, -100, dtype=torch.float64) / 999)
    t = noise_levels(sde, 10, "leading", t_end=0.1)
    torch.testing.assert_close(t, 0.1 + (sde.T - 0.1) * torch.arange(900, -1, -100, dtype=torch.float64) / 999)
    assert float(noise_levels(sde, 10, "leading")[-1]) == sde.sample_eps
    assert float(noise_levels(sde, 1000, "leading")[0]) == sde.T
    for spacing in ("leading", "quadratic"):  # timesteps of DDPM's 1000-step chain
        with pytest.raises(ConfigError, match="allows at most 1000 steps"):
            noise_levels(sde, 1001, spacing, t_end=1e-3)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_adaptive_solver_meets_its_tolerance(sde_name):
    sde = SDES[sde_name]
    x, _ = _start(sde, 64, 2)
    model = ExactGaussian(sde)
    out = ode(model, x, 1, solver="adaptive", rtol=1e-7, atol=1e-7)
    assert float((out - _exact_ode_x0(sde, x)).abs().max()) < 1e-4
    assert 10 < model.calls < 2000


STOCHASTIC = [
    ({"name": "ddpm", "spacing": "leading"}, 200, 16),
    ({"name": "ddpm", "variance": "large"}, 200, 16),
    ({"name": "ddim", "eta": 0.5, "spacing": "uniform"}, 200, 16),
    ({"name": "pc", "predictor": "ancestral", "corrector": "none", "variance": "large"}, 200, 16),
    ({"name": "pc", "predictor": "reverse_diffusion", "corrector": "none"}, 500, 16),
    ({"name": "pc", "predictor": "euler_maruyama", "corrector": "none"}, 500, 16),
    ({"name": "pc", "predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.05}, 200, 256),
    ({"name": "ode", "solver": "heun"}, 30, 16),
    ({"name": "ode", "solver": "adaptive"}, 1, 16),
    ({"name": "edm"}, 50, 16),  # EDM's ImageNet-64 churn (S_noise 1.003)
    ({"name": "edm", "S_churn": 80.0, "S_tmin": 0.0, "S_tmax": None, "S_noise": 1.0}, 50, 16),  # the most churn, everywhere
    ({"name": "euler_ancestral"}, 200, 16),
    ({"name": "euler_ancestral", "eta": 0.5}, 200, 16),
    ({"name": "dpmpp_2m_sde"}, 50, 16),
    ({"name": "dpmpp_2m_sde", "solver_type": "heun", "eta": 0.5}, 50, 16),
    ({"name": "dpmpp_3m_sde"}, 50, 16),
    ({"name": "dpmpp_3m_sde", "eta": 0.5}, 50, 16),
]


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("spec,steps,dim", STOCHASTIC, ids=lambda v: "-".join(map(str, v.values())) if isinstance(v, dict) else None)
def test_samplers_reach_the_data_distribution(sde_name, spec, steps, dim):
    """Mean and std of the samples against N(M, C^2): 5 standard errors of the estimates plus 2%
    of C for the discretization."""
    sde = SDES[sde_name]
    n = 8192 // dim  # 8192 independent coordinates: the model's dimensions are independent
    x = generate(ExactGaussian(sde), n, (dim,), spec, steps, seed=0).double()
    count = x.numel()
    assert abs(float(x.mean()) - M) < 5 * C / math.sqrt(count) + 0.02 * C
    assert abs(float(x.std()) - C) < 5 * C / math.sqrt(2 * count) + 0.02 * C


def _ula_moments(mean0, var0, mu, v, steps, step_size):
    """Mean and variance, per coordinate, of the unadjusted Langevin iteration x <- x + e score + sqrt(2e) z
    on the Gaussian target N(mu, v) (score = -(x - mu)/v) after `steps` steps from N(mean0, var0):
    x - mu <- r (x - mu) + sqrt(2e) z with r = 1 - e/v, so m <- r m and V <- r^2 V + 2e. Its fixed
    point is V = v / (1 - e/(2v)), the ULA bias. step_size(Q) gives e from the current second
    moment Q = V + m^2 about mu (score_sde's norm-ratio step depends on it)."""
    m, var = mean0 - mu, var0
    for _ in range(steps):
        e = step_size(var + m * m)
        r = 1 - e / v
        m, var = r * m, r * r * var + 2 * e
    return mu + m, var


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("corrector,snr", [("ald", 0.3), ("langevin", 0.3)])
def test_correctors_follow_the_unadjusted_langevin_moments(sde_name, corrector, snr):
    """Langevin steps at a fixed level on p_t = N(alpha M, v), v = alpha^2 C^2 + sigma^2, started off
    target at N(0, 2v): after k steps the mean and variance are the closed-form ULA moments
    (_ula_moments), including the known bias of the stationary variance. ald's step is the fixed
    e = 2 (snr sigma)^2; score_sde's langevin step is e = 2 (snr mean||z|| / mean||score||)^2, which in
    D = 1024 dimensions is 2 snr^2 v^2 / Q to O(1/D) (both norms are chi-distributed), so its
    stationary variance is v (1 + snr^2). 65536 coordinates: 5 standard errors of the variance are
    2.8%, and a +10% variance bias (noise scaled by sqrt(1.1)) fails."""
    sde = SDES[sde_name]
    level = Level.from_ratio(sde, C)  # s = C: data and noise matter equally
    v, mu = level.alpha**2 * C**2 + level.sigma**2, level.alpha * M
    model, n, dim, steps = ExactGaussian(sde), 64, 1024, 30
    noise = SampleNoise(0, range(n))
    y = math.sqrt(2 * v) / level.alpha * noise.randn((dim,), torch.float64)  # x off: mean 0, variance 2v
    for _ in range(steps):
        y = CORRECTORS[corrector](model, y, level, None, None, noise, snr)
    x = level.alpha * y
    if corrector == "ald":
        step_size = lambda q: 2 * (snr * level.sigma) ** 2  # noqa: E731
    else:
        step_size = lambda q: 2 * snr**2 * v * v / q  # noqa: E731
    mean, var = _ula_moments(0.0, 2 * v, mu, v, steps, step_size)
    count = x.numel()
    assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / count)
    assert abs(float(x.var()) / var - 1) < 5 * math.sqrt(2 / count) + (0 if corrector == "ald" else 2e-3)
    if corrector == "langevin":  # 30 steps reach the fixed point of the norm-ratio step
        assert var == pytest.approx(v * (1 + snr**2), rel=1e-4)


@pytest.mark.parametrize(
    "spec",
    [{"name": "ddpm"}, {"name": "ddim", "eta": 0.3}, {"name": "pc", "corrector_steps": 2}, {"name": "ode", "solver": "dpmpp_2m"},
     {"name": "edm", "S_tmin": 0.0, "S_tmax": None}, {"name": "euler_ancestral"}, {"name": "dpmpp_2m_sde"}, {"name": "dpmpp_3m_sde"}],
)  # fmt: skip
def test_a_sample_does_not_depend_on_its_batch(spec):
    model = ExactGaussian(SDES["vp"])
    whole = generate(model, 6, (5,), spec, 6, seed=3)
    parts = torch.cat([generate(model, 2, (5,), spec, 6, seed=3, first_index=i) for i in (0, 2, 4)])
    torch.testing.assert_close(whole, parts)
    assert not torch.allclose(whole, generate(model, 6, (5,), spec, 6, seed=4))


@pytest.mark.parametrize(
    "spec,nfe",
    [({"name": "ddpm"}, 7), ({"name": "ddim"}, 7), ({"name": "ode", "solver": "euler"}, 7), ({"name": "ode", "solver": "heun"}, 13),
     ({"name": "ode", "solver": "rk4"}, 25), ({"name": "ode", "solver": "dpmpp_2m"}, 7), ({"name": "pc"}, 14),
     ({"name": "pc", "corrector_steps": 2}, 21), ({"name": "pc", "predictor": "none", "corrector": "ald", "corrector_steps": 3}, 22),
     ({"name": "pc", "corrector": "none"}, 7), ({"name": "consistency"}, 7), ({"name": "edm"}, 13),
     ({"name": "edm", "S_churn": 0.0}, 13), ({"name": "euler_ancestral"}, 7), ({"name": "dpmpp_2m_sde"}, 7), ({"name": "dpmpp_3m_sde"}, 7)],
)
def test_network_evaluations_per_sampler(spec, nfe):
    model = ExactGaussian(SDES["ve"])
    generate(model, 2, (3,), spec, 7)
    assert model.calls == nfe


@pytest.mark.parametrize(
    "spec,message",
    [({"name": "dpm"}, "unknown sampler 'dpm'"), ({"name": "ddim", "eta": 1.5}, "eta must be in [0, 1]"),
     ({"name": "ddpm", "eta": 0.5}, "sampler=ddpm has no option eta"), ({"name": "ode", "solver": "rk45"}, "solver must be one of"),
     ({"name": "pc", "predictor": "langevin"}, "predictor must be one of"), ({"name": "pc", "snr": 0}, "snr must be > 0"),
     ({"name": "ddim", "spacing": "linear"}, "spacing must be one of"), ({"name": "pc", "corrector_steps": -1}, "corrector_steps"),
     ({"name": "ddim", "spacing": "auto"}, "spacing must be one of"),  # auto is the ODE solvers' own choice only
     ({"name": "ddpm", "variance": "fixed_large"}, "sampler.variance must be one of small, large"),
     ({"name": "pc", "variance": "large"}, "variance=large is the ancestral predictor's; add sampler.predictor=ancestral"),
     ({"name": "ddim", "variance": "large"}, "sampler=ddim has no option variance"),
     ({"name": "ode", "lower_order_final": "yes"}, "lower_order_final must be true or false"),
     ({"name": "ode", "sigma_min": 0}, "sigma_min must be > 0"), ({"name": "ode", "sigma_max": "80"}, "sigma_max must be a number"),
     ({"name": "ode", "sigma_min": 90.0, "sigma_max": 80.0}, "sigma_min must be below sampler.sigma_max"),
     ({"name": "edm", "S_churn": -1}, "sampler.S_churn must be >= 0"), ({"name": "edm", "S_noise": 0}, "sampler.S_noise must be > 0"),
     ({"name": "edm", "S_tmin": 2.0, "S_tmax": 1.0}, "sampler.S_tmin must not exceed sampler.S_tmax, got 2.0 and 1.0"),
     ({"name": "edm", "S_tmax": "inf"}, "sampler.S_tmax must be a number"), ({"name": "edm", "S_tmin": -0.1}, "S_tmin must be >= 0"),
     ({"name": "edm", "spacing": "uniform", "sigma_max": 80.0}, "sampler.sigma_max needs sampler.spacing=karras or logsnr .it moves an end of those levels., got uniform$"),
     ({"name": "edm", "solver": "heun"}, "sampler=edm has no option solver"),
     ({"name": "euler_ancestral", "eta": -0.5}, "sampler.eta must be >= 0"), ({"name": "euler_ancestral", "s_noise": -1}, "s_noise must be >= 0"),
     ({"name": "euler_ancestral", "spacing": "trailing", "sigma_min": 0.1}, "sampler.sigma_min needs sampler.spacing=karras or logsnr"),
     ({"name": "dpmpp_2m_sde", "solver_type": "rk4"}, "sampler.solver_type must be one of midpoint, heun"),
     ({"name": "dpmpp_2m_sde", "sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min must be below sampler.sigma_max"),
     ({"name": "dpmpp_3m_sde", "solver_type": "heun"}, "sampler=dpmpp_3m_sde has no option solver_type"),
     ({"name": "dpmpp_3m_sde", "eta": float("nan")}, "sampler.eta must be a finite number >= 0")],
)
def test_bad_sampler_options_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_sampler(spec)


def test_ode_default_is_dpmpp_2m_on_logsnr_levels_and_auto_spacing_follows_the_solver():
    """`diffctl sample`'s default sampler (conf/sampler/ode.yaml: dpmpp_2m, spacing auto) and the
    function's defaults agree; auto picks logsnr for dpmpp_2m and EDM's karras for the others."""
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "sampler" / "ode.yaml")
    assert (conf.solver, conf.spacing) == ("dpmpp_2m", "auto")
    sde = SDES["vp"]
    x, _ = _start(sde, 4, 3)
    run = lambda **kw: ode(ExactGaussian(sde), x, 6, **kw)  # noqa: E731
    assert torch.equal(run(), run(solver="dpmpp_2m", spacing="logsnr"))
    assert not torch.equal(run(), run(solver="dpmpp_2m", spacing="karras"))
    for solver in ("euler", "heun", "rk4"):
        assert torch.equal(run(solver=solver), run(solver=solver, spacing="karras"))
    assert check_sampler({"name": "ode", "spacing": "auto"}) == ("ode", {"spacing": "auto"})
    defaults = sampler_options("ode")
    for key in ("lower_order_final", "sigma_min", "sigma_max"):
        assert conf[key] == defaults[key], key


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_karras_levels_run_from_sigma_max_to_sample_eps(sde_name):
    """EDM's levels s_i = (s_max^(1/7) + i/(N-1) (s_min^(1/7) - s_max^(1/7)))^7 with s_max =
    min(sigma_max, s(T)) and s_min = s(sample_eps) (sigma_min null), or max(sigma_min, s(eps)):
    VP (s(T) = 152) starts at 80, VE with sigma_max 50 at T exactly, as before."""
    sde = VPSDE() if sde_name == "vp" else VESDE(sigma_max=50.0)
    ratio = lambda t: float(sde.noise_ratio(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    for sigma_max, sigma_min in ((80.0, None), (None, None), (80.0, 0.002), (1e4, 1e-9)):
        hi = min(sigma_max or math.inf, ratio(sde.T))
        lo = ratio(sde.sample_eps) if sigma_min is None else max(sigma_min, ratio(sde.eps))
        i = torch.arange(10, dtype=torch.float64) / 9
        expected = (hi ** (1 / 7) + i * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
        t = ratio_levels(sde, 10, "karras", sigma_max, sigma_min)
        torch.testing.assert_close(sde.noise_ratio(t), expected, rtol=1e-10, atol=0)
        assert (float(t[0]) == sde.T) == (hi == ratio(sde.T))
    if sde_name == "vp":
        assert not torch.equal(ratio_levels(sde, 10, "karras", 80.0), noise_levels(sde, 10, "karras"))
    torch.testing.assert_close(ratio_levels(sde, 10, "karras"), noise_levels(sde, 10, "karras"), rtol=0, atol=0)


class _ClassMeans(torch.nn.Module):
    """A conditional 'network' predicting x0 = the class mean (row num_classes = the null class)."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.means = torch.tensor([1.0, -2.0, 0.25])

    def forward(self, x, noise, labels):
        return self.means[labels].reshape(-1, 1) .expand_as(x).clone()


def test_classifier_free_guidance_extrapolates_from_the_null_class():
    denoiser = compose(_ClassMeans(), VPSDE(), prediction="x0", scale_input=False)
    x, t, cond = torch.randn(4, 3), torch.full((4,), 0.5), {"class_label": torch.tensor([0, 1, 0, 1])}
    for w in (0.0, 1.0, 3.0):
        pred = GuidedModel(denoiser, w)(x, t, cond)
        expected = 0.25 + w * (torch.tensor([1.0, -2.0, 1.0, -2.0]) - 0.25)
        torch.testing.assert_close(pred.x0, expected.reshape(-1, 1).expand(4, 3))
        plain = denoiser(x, t, cond) if w == 1.0 else None
        if plain is not None:
            torch.testing.assert_close(pred.eps, plain.eps)


def test_clipped_denoiser_keeps_x0_in_range_and_eps_consistent():
    sde = VPSDE()

    class Far:  # predicts x0 = 3 everywhere, outside the data range
        def __init__(self):
            self.sde = sde

        def __call__(self, x, t, cond=None):
            s = broadcast(sde.sigma(t), x)
            x0 = torch.full_like(x, 3.0)
            return Prediction(x0=x0, eps=(x - broadcast(sde.alpha(t), x) * x0) / s, sigma=s)

    x, t = torch.randn(4, 2), torch.full((4,), 0.3)
    pred = ClippedModel(Far())(x, t)
    assert torch.equal(pred.x0, torch.ones_like(x))
    torch.testing.assert_close(broadcast(sde.alpha(t), x) * pred.x0 + pred.sigma * pred.eps, x)
