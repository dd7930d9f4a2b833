"""Issue 19: EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) and k-diffusion's SDE samplers
(Euler ancestral, DPM-Solver++(2M) SDE and (3M) SDE), against diffusers' schedulers as step-by-step
oracles, driven by the same exact mixture model and the same noise, and against identities with the
samplers they reduce to. Their sample distributions on the exact Gaussian and mixture models are in
tests/test_samplers.py (STOCHASTIC) and tests/test_ground_truth.py (DIST_CASES), NFE, batch
independence and option errors in test_samplers.py's tables.

The noise: our samplers draw from `SampleNoise` (draw 0 the start, then one draw per noisy step);
each oracle is given the same draws, in the same order, in place of its own torch.randn."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers.schedulers.deprecated.scheduling_karras_ve as karras_ve  # noqa: E402
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a  # noqa: E402
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler  # noqa: E402
from test_diffusers_oracle import DiscreteVP, _mixture, bench  # noqa: E402

from diffctl.networks.gmm import MixtureModel  # noqa: E402
from diffctl.noise import SampleNoise  # noqa: E402
from diffctl.samplers import ddpm, dpmpp_2m_sde, dpmpp_3m_sde, edm, euler_ancestral, ode  # noqa: E402
from diffctl.samplers.common import spaced_levels  # noqa: E402
from diffctl.sde import SubVPSDE, VESDE, VPSDE  # noqa: E402

B, D = 64, 3
SDES = {"vp": VPSDE(), "vpsub": SubVPSDE(), "ve": VESDE(sigma_max=20.0)}


def _noise(seed: int):
    """(start x, the sampler's noise after its draw 0, a replay of that noise for the oracle)."""
    z = SampleNoise(seed, range(B)).randn((D,), torch.float64)
    ours, replay = SampleNoise(seed, range(B)), SampleNoise(seed, range(B))
    ours.randn((D,), torch.float64)
    replay.randn((D,), torch.float64)
    return z, ours, replay


class Recorder(torch.nn.Module):
    """A model that records the times it is called at."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sde, self.times = inner, inner.sde, []

    def forward(self, x, t, cond=None):
        self.times.append(float(t[0]))
        return self.inner(x, t, cond)


# --------------------------------------------------------------------------- edm: Algorithm 2


def _y_denoiser(mixture, sde_name):
    """D(y, s) = E[x0 | y = x0 + s eps] for VP (alpha = 1/sqrt(1 + s^2)) or VE (alpha = 1)."""

    def D_(y, s):
        a = 1.0 if sde_name == "ve" else 1.0 / math.sqrt(1.0 + s * s)
        return mixture.denoise(a * y, a, a * s)[0]

    return D_


def _karras_ve_loop(sched, D_, y, sigmas, replay, monkeypatch):
    """diffusers' KarrasVePipeline loop (stochastic_karras_ve, Algorithm 2) on our levels `sigmas`
    followed by 0: add_noise_to_input (the churn), step (Euler), step_correct (Heun) where the next
    sigma is not 0. The churn's normal is ours where the level churns (the draw we make), else 0
    (multiplied by gamma = 0 there)."""
    cfg = sched.config
    pending = []
    monkeypatch.setattr(karras_ve, "randn_tensor", lambda shape, generator=None, **kw: pending.pop())
    for sigma, sigma_prev in zip(sigmas, [*sigmas[1:], 0.0]):
        churns = cfg.s_churn > 0 and cfg.s_min <= sigma <= cfg.s_max
        pending.append(replay.randn((D,), torch.float64) if churns else torch.zeros_like(y))
        y_hat, sigma_hat = sched.add_noise_to_input(y, sigma)
        out = sched.step((D_(y_hat, sigma_hat) - y_hat) / sigma_hat, sigma_hat, sigma_prev, y_hat)
        y = out.prev_sample
        if sigma_prev != 0:
            corr = (D_(y, sigma_prev) - y) / sigma_prev
            y = sched.step_correct(corr, sigma_hat, sigma_prev, y_hat, y, out.derivative).prev_sample
    return y


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("S_churn,S_tmin,S_tmax,S_noise", [(40.0, 0.05, 10.0, 1.003), (100.0, 0.3, 5.0, 1.0), (3.0, 0.0, 15.0, 0.8)])
def test_edm_equals_karras_ve_scheduler_algorithm_2(sde_name, S_churn, S_tmin, S_tmax, S_noise, monkeypatch):
    """Our edm equals diffusers' KarrasVeScheduler (EDM's Algorithm 2: churn, Euler step from s_hat,
    Heun correction, the last step an Euler step to 0, which is D at the last level) run on our
    karras levels with the same churn normals: gamma = min(S_churn/N, sqrt 2 - 1) inside
    [S_tmin, S_tmax] (both ends included), s_hat, the noise's sqrt(s_hat^2 - s^2) S_noise and both
    Heun evaluations. S_tmax stays below s(T) (152 VP, 20 VE), where our s_hat is capped (the next test);
    every case has churning and non-churning levels, and without the churn the result moves (asserted)."""
    sde, mixture, steps = SDES[sde_name], _mixture(), 12
    z, ours_noise, replay = _noise(11)
    x = sde.prior_std() * z
    options = dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise)
    ours = edm(MixtureModel(mixture, sde), x, steps, noise=ours_noise, **options)

    sigmas = [lv.s for lv in spaced_levels(sde, steps, "karras")]
    churned = [S_tmin <= s <= S_tmax for s in sigmas]
    assert any(churned) and not all(churned)
    sched = karras_ve.KarrasVeScheduler(s_churn=S_churn, s_min=S_tmin, s_max=S_tmax, s_noise=S_noise)
    sched.set_timesteps(steps)  # its gamma's N; its own (geometric) schedule is not used
    alpha_T = float(sde.alpha(torch.tensor(sde.T, dtype=torch.float64)))
    theirs = _karras_ve_loop(sched, _y_denoiser(mixture, sde_name), x / alpha_T, sigmas, replay, monkeypatch)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    heun = ode(MixtureModel(mixture, sde), x, steps, solver="heun")
    assert (heun - theirs).abs().max() > 1e-2


@pytest.mark.parametrize("sde_name", list(SDES))
def test_edm_without_churn_is_the_deterministic_heun(sde_name):
    """S_churn = 0, or a churn range no level falls in, is `ode` solver=heun on the same levels, bit
    for bit, including karras levels from sigma_max and the NFE 2N - 1; then the noise is never drawn."""
    sde = SDES[sde_name]
    model = MixtureModel(_mixture(), sde)
    x = sde.prior_std() * SampleNoise(3, range(B)).randn((D,), torch.float64)
    for levels in ({}, {"sigma_max": 5.0, "sigma_min": 0.05}):
        heun = ode(model, x, 9, solver="heun", spacing="karras", **levels)
        assert torch.equal(edm(model, x, 9, noise=None, S_churn=0.0, **levels), heun)
        assert torch.equal(edm(model, x, 9, noise=None, S_churn=40.0, S_tmin=200.0, S_tmax=None, **levels), heun)
        assert not torch.equal(edm(model, x, 9, noise=SampleNoise(3, range(B)), S_churn=40.0, S_tmin=0.0, **levels), heun)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_edm_churn_never_climbs_above_T(sde_name):
    """s_hat is capped at s(T): with S_tmax null the first level (at T) would ask for s_hat = (1 + gamma)
    s(T), which the SDE does not have; it gets no churn, so the run equals one whose S_tmax lies between
    the first two levels, and no model call is past T. Every later level is churned (S_tmin = 0), at a
    time t(s_hat) above its own."""
    sde = SDES[sde_name]
    model = Recorder(MixtureModel(_mixture(), sde))
    x = sde.prior_std() * SampleNoise(5, range(B)).randn((D,), torch.float64)
    levels = spaced_levels(sde, 8, "karras")
    between = (levels[0].s + levels[1].s) / 2
    capped = edm(model, x, 8, noise=SampleNoise(5, range(B)), S_churn=40.0, S_tmin=0.0, S_tmax=None, S_noise=1.0)
    assert max(model.times) == sde.T and model.times.count(sde.T) == 1
    hats = model.times[2::2]  # after the first level, each step's first call is at t(s_hat)
    assert all(t > lv.t for t, lv in zip(hats, levels[1:]))
    expected = edm(model, x, 8, noise=SampleNoise(5, range(B)), S_churn=40.0, S_tmin=0.0, S_tmax=between, S_noise=1.0)
    assert torch.equal(capped, expected)


# --------------------------------------------------------------------------- euler_ancestral


def test_euler_ancestral_equals_euler_ancestral_discrete_scheduler(monkeypatch):
    """Our euler_ancestral (eta 1, spacing=trailing) on diffusers' schedule equals
    EulerAncestralDiscreteScheduler (timestep_spacing=trailing) given our normals: the Euler step to
    s_down and the noise s_up at each step, the last step to 0 (x0). Another noise stream disagrees."""
    sched = EulerAncestralDiscreteScheduler(timestep_spacing="trailing")
    mixture, steps = _mixture(), 10
    sde = DiscreteVP(sched.alphas_cumprod)
    z, ours_noise, replay = _noise(2)
    sched.set_timesteps(steps)
    s_max = float(sched.sigmas[0])
    alpha_T = float(sde.alpha(torch.tensor(1.0)))
    ours = euler_ancestral(MixtureModel(mixture, sde), z * s_max * alpha_T, steps, noise=ours_noise, spacing="trailing")

    monkeypatch.setattr(euler_a, "randn_tensor", lambda shape, **kw: replay.randn((D,), torch.float64))
    model, y = bench.ExactModel(mixture), z * s_max
    for i, t in enumerate(sched.timesteps):
        _, eps = model(sched.scale_model_input(y, t), *bench.level_sigma(sched, i, t))
        y = sched.step(eps, t, y).prev_sample
    assert model.calls == steps
    torch.testing.assert_close(ours, y.double(), rtol=2e-5, atol=2e-5)
    other = euler_ancestral(MixtureModel(mixture, sde), z * s_max * alpha_T, steps, noise=SampleNoise(9, range(B)), spacing="trailing")
    assert (other - y).abs().max() > 1e-2


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("spacing", ["karras", "trailing"])
def test_euler_ancestral_is_ddpm_at_eta_1_and_euler_at_eta_0(sde_name, spacing):
    """eta = 1: s_up is the DDPM posterior's std and s_down = s'^2/s, so the step is `ddpm`'s posterior
    mean plus the same noise (float rounding apart). eta = 0: no noise, `ode` solver=euler bit for bit."""
    sde = SDES[sde_name]
    model = MixtureModel(_mixture(), sde)
    x = sde.prior_std() * SampleNoise(4, range(B)).randn((D,), torch.float64)
    noise = lambda: SampleNoise(4, range(B))  # noqa: E731
    a = euler_ancestral(model, x, 12, noise=_skip(noise()), spacing=spacing)
    b = ddpm(model, x, 12, noise=_skip(noise()), spacing=spacing)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.equal(euler_ancestral(model, x, 12, noise=None, eta=0.0, spacing=spacing), ode(model, x, 12, solver="euler", spacing=spacing))
    assert (euler_ancestral(model, x, 12, noise=_skip(noise()), eta=0.5, spacing=spacing) - b).abs().max() > 1e-2


def _skip(noise):
    noise.randn((D,), torch.float64)  # draw 0, the start noise
    return noise


# --------------------------------------------------------------------------- DPM-Solver++ SDE


def _drive_dpm(sched, mixture, x, steps, replay):
    """DPMSolverMultistepScheduler's loop, given our normal at each step but the last (to sigma 0,
    where its noise term is 0)."""
    sched.set_timesteps(steps)
    model = bench.ExactModel(mixture)
    for i, t in enumerate(sched.timesteps):
        _, eps = model(x, *bench.level_sigma(sched, i, t))
        last = i == len(sched.timesteps) - 1
        z = torch.zeros_like(x) if last or replay is None else replay.randn((D,), torch.float64)
        x = sched.step(eps, t, x, variance_noise=z).prev_sample
    assert model.calls == steps
    return x.double()


DPM = dict(timestep_spacing="trailing", final_sigmas_type="zero", lower_order_final=False)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("steps", [4, 10, 20])
def test_dpmpp_2m_sde_equals_sde_dpmsolver_plus_plus(solver_type, steps):
    """Our dpmpp_2m_sde (eta 1, spacing=trailing) equals DPMSolverMultistepScheduler with
    algorithm_type=sde-dpmsolver++, solver_order=2 and the same solver_type, given our normals:
    the first-order first step, the multistep correction and the noise s' sqrt(1 - e^{-2h}) at each
    step, the last to 0 (x0). lower_order_final off: k-diffusion keeps second order to the end."""
    cfg = dict(DPM, algorithm_type="sde-dpmsolver++", solver_order=2, solver_type=solver_type)
    mixture = _mixture()
    sde = DiscreteVP(DPMSolverMultistepScheduler(**cfg).alphas_cumprod)
    z, ours_noise, replay = _noise(6)
    ours = dpmpp_2m_sde(MixtureModel(mixture, sde), z, steps, noise=ours_noise, solver_type=solver_type, spacing="trailing")
    theirs = _drive_dpm(DPMSolverMultistepScheduler(**cfg), mixture, z, steps, replay)
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)
    other = dpmpp_2m_sde(MixtureModel(mixture, sde), z, steps, noise=_noise(6)[1], spacing="trailing",
                         solver_type="heun" if solver_type == "midpoint" else "midpoint")  # fmt: skip
    assert (other - theirs).abs().max() > 1e-4


class KDiffusionOrder3(DPMSolverMultistepScheduler):
    """diffusers' sde-dpmsolver++ at order 3 with k-diffusion's weight on D2. diffusers weighs D2 by
    (1 - e^{-2h} - 2h)/(2h)^2 - 1/2; k-diffusion's 3M SDE at eta = 1 by -phi_3 = that + 1/2 (its
    ODE's weight, dpmsolver++'s, is -phi_3 too, with h for 2h). So this adds alpha_t D2 to diffusers'
    update, D2 recomputed from the same model outputs. Measured on a smooth x0(lambda): the
    local error of k-diffusion's update falls as h^3 (as the second-order one's), diffusers' as h^2."""

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        x_t = super().multistep_dpm_solver_third_order_update(model_output_list, *args, sample=sample, noise=noise, **kwargs)
        i = self.step_index
        alpha_sigma = [self._sigma_to_alpha_sigma_t(self.sigmas[i + k]) for k in (1, 0, -1, -2)]
        lam = [torch.log(a) - torch.log(s) for a, s in alpha_sigma]
        h, h_0, h_1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        r0, r1 = h_0 / h, h_1 / h
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        return x_t + alpha_sigma[0][0] * d2


@pytest.mark.parametrize("steps", [4, 10, 20])
def test_dpmpp_3m_sde_equals_dpm_solver_multistep_order_3(steps):
    """eta = 0: DPMSolverMultistepScheduler(dpmsolver++, solver_order=3), the ODE's DPM-Solver++(3M),
    orders 1, 2, then 3 (solver_type=heun: k-diffusion's second step is the heun-type phi_2 D1; the
    third-order update has no solver_type). eta = 1: sde-dpmsolver++ at order 3 with k-diffusion's D2 weight
    (KDiffusionOrder3; its first- and second-order steps are diffusers' own), given our normals;
    diffusers' unchanged order-3 SDE update differs from it by far more than the tolerance (asserted)."""
    mixture = _mixture()
    sde = DiscreteVP(DPMSolverMultistepScheduler(**DPM).alphas_cumprod)
    z, ours_noise, replay = _noise(8)
    ode3 = dpmpp_3m_sde(MixtureModel(mixture, sde), z, steps, noise=None, eta=0.0, spacing="trailing")
    theirs = _drive_dpm(DPMSolverMultistepScheduler(**DPM, algorithm_type="dpmsolver++", solver_order=3, solver_type="heun"), mixture, z, steps, None)
    torch.testing.assert_close(ode3, theirs, rtol=2e-5, atol=2e-5)

    sde3 = dpmpp_3m_sde(MixtureModel(mixture, sde), z, steps, noise=ours_noise, spacing="trailing")
    cfg = dict(DPM, algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun")
    theirs = _drive_dpm(KDiffusionOrder3(**cfg), mixture, z, steps, replay)
    torch.testing.assert_close(sde3, theirs, rtol=2e-5, atol=2e-5)
    plain = _drive_dpm(DPMSolverMultistepScheduler(**cfg), mixture, z, steps, _noise(8)[2])
    assert (plain - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("sde_name", list(SDES))
def test_dpmpp_sde_at_eta_0_are_the_ode_multistep_solvers(sde_name):
    """eta = 0 draws no noise: dpmpp_2m_sde (midpoint) is `ode` solver=dpmpp_2m with lower_order_final
    off (the same update, in another order of operations); 3M differs from 2M from its third step on."""
    sde = SDES[sde_name]
    model = MixtureModel(_mixture(), sde)
    x = sde.prior_std() * SampleNoise(1, range(B)).randn((D,), torch.float64)
    two = dpmpp_2m_sde(model, x, 10, noise=None, eta=0.0)
    torch.testing.assert_close(two, ode(model, x, 10, solver="dpmpp_2m", spacing="karras", lower_order_final=False), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dpmpp_3m_sde(model, x, 3, noise=None, eta=0.0), dpmpp_2m_sde(model, x, 3, noise=None, eta=0.0, solver_type="heun"),
                               rtol=1e-10, atol=1e-10)  # fmt: skip
    assert (dpmpp_3m_sde(model, x, 10, noise=None, eta=0.0) - two).abs().max() > 1e-4


# --------------------------------------------------------------------------- s_noise


class ExactGaussian:
    """E[x0 | x_t] for x0 ~ N(M, C^2): affine in x, so a sampler's output is affine in its noise."""

    M, C = 0.5, 0.3

    def __init__(self, sde):
        self.sde = sde

    def __call__(self, x, t, cond=None):
        from diffctl.denoiser import Prediction
        from diffctl.sde import broadcast

        a, s = broadcast(self.sde.alpha(t.double()), x), broadcast(self.sde.sigma(t.double()), x)
        x0 = self.M + a * self.C**2 / (a * a * self.C**2 + s * s) * (x - a * self.M)
        return Prediction(x0=x0, eps=(x - a * x0) / s, sigma=s)


@pytest.mark.parametrize(
    "sampler,key,options",
    [(edm, "S_noise", {"S_churn": 40.0, "S_tmin": 0.0, "S_tmax": None}), (euler_ancestral, "s_noise", {}),
     (dpmpp_2m_sde, "s_noise", {}), (dpmpp_3m_sde, "s_noise", {}), (dpmpp_2m_sde, "s_noise", {"eta": 0.4})],
)  # fmt: skip
def test_the_noise_factor_scales_the_added_noise(sampler, key, options):
    """With an affine denoiser the output is affine in the added noise: out(f) - out(0) is f times
    out(1) - out(0), and nonzero. A noise factor applied twice, or not at all, fails this."""
    sde = VPSDE()
    x = SampleNoise(2, range(B)).randn((D,), torch.float64)
    run = lambda f: sampler(ExactGaussian(sde), x, 8, noise=_skip(SampleNoise(2, range(B))), **{key: f}, **options)  # noqa: E731
    base, one = run(0.0), run(1.0)
    assert (one - base).abs().max() > 1e-2
    torch.testing.assert_close(run(2.5) - base, 2.5 * (one - base), rtol=1e-9, atol=1e-9)
