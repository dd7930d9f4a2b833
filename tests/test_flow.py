"""Flow matching on the linear path (issue 19): the flow parameterization, the exact velocity of a
Gaussian mixture, the flow objective's minimizer and time draws, rectified flow's Euler sampler
(by hand and diffusers'), and the CLI: training sde=linear objective=flow, sampling model=gmm on it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from diffctl.denoiser import Prediction
from diffctl.networks.gmm import GaussianMixture, MixtureModel
from diffctl.objectives import FlowObjective, sample_times
from diffctl.parameterization import make_parameterization, split_velocity, velocity
from diffctl.prediction import OBJECTIVE_PREDICTIONS, model_prediction
from diffctl.rng import BatchRandom
from diffctl.samplers import ode
from diffctl.sde import LinearSDE, SubVPSDE, VESDE, VPSDE, broadcast
from helpers import load_ckpt, run_cli, run_sample, run_train, tiny_overrides

SDES = {"vp": VPSDE(), "vpsub": SubVPSDE(), "ve": VESDE(0.02, 10.0), "linear": LinearSDE()}
MIXTURE = GaussianMixture(
    means=[[-2.0, 0.5, 0.0], [1.5, 1.5, -0.5], [1.0, -2.0, 1.0]],
    covariances=[
        [[0.5, 0.3, -0.1], [0.3, 0.4, 0.05], [-0.1, 0.05, 0.3]],
        [[0.2, 0.0, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 0.3]],
        [[0.25, 0.0, 0.0], [0.0, 0.25, 0.0], [0.0, 0.0, 0.25]],
    ],
    weights=[0.5, 0.3, 0.2],
)


def _t(v):
    return torch.as_tensor(v, dtype=torch.float64)


def _rng(n, seed=0):
    return BatchRandom(seed, 0, 0, 0, 1, n, "cpu")


# ------------------------------------------------------------------------ parameterization
@pytest.mark.parametrize("sde_name", list(SDES))
def test_flow_parameterization_maps_the_velocity_to_x0_and_eps(sde_name):
    """The network output u = alpha' x0 + sigma' eps gives back (x0, eps), and EDM's form
    c_skip x + c_out u the same x0; on the linear path x0 = x - t u, eps = x + (1 - t) u."""
    sde = SDES[sde_name]
    t = _t([0.01, 0.2, 0.5, 0.8, 0.99 * sde.T])
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    x = a * x0 + s * eps
    u = sde.alpha_dot(t)[:, None] * x0 + sde.sigma_dot(t)[:, None] * eps
    torch.testing.assert_close(velocity(sde, t, x0, eps), u, rtol=0, atol=0)
    p = make_parameterization("flow", sde)
    got_x0, got_eps = p.predict(u, x, t, a, s)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)
    c_skip, c_out = p.c_skip_out(t, a, s)
    torch.testing.assert_close(c_skip * x + c_out * u, x0)
    if sde_name == "linear":
        torch.testing.assert_close(u, eps - x0)
        torch.testing.assert_close(got_x0, x - t[:, None] * u)
        torch.testing.assert_close(got_eps, x + (1 - t[:, None]) * u)


def test_flow_is_a_prediction_every_denoising_objective_trains():
    assert OBJECTIVE_PREDICTIONS["diffctl.objectives.FlowObjective"][:2] == ("flow", "flow")
    flow = {"_target_": "diffctl.objectives.FlowObjective"}
    assert model_prediction({"objective": flow}) == "flow"
    for chosen in ("eps", "x0", "v", "score", "flow"):
        assert model_prediction({"objective": flow, "denoiser": {"prediction": chosen}}) == chosen
        assert model_prediction({"objective": {"_target_": "diffctl.objectives.DDPMObjective"}, "denoiser": {"prediction": chosen}}) == chosen


# ------------------------------------------------------------------ the mixture's velocity
def _log_p(sde, x, t):
    return MIXTURE.log_prob(x, sde.alpha(_t(t)), sde.sigma(_t(t)))


@pytest.mark.parametrize("sde_name", ["linear", "vp"])
def test_mixture_velocity_solves_the_continuity_equation(sde_name):
    """The exact velocity u(x, t) = alpha' E[x0|x] + sigma' E[eps|x] of the mixture (from MixtureModel's
    closed-form denoiser) transports its marginal: d/dt log p_t + div u + u . grad log p_t = 0, with
    log p_t the mixture's exact density, its t-derivative by central differences and div u, grad log p
    by autograd. The identity is what makes u the probability-flow velocity; a sign flip of sigma'
    or of det breaks it by O(1)."""
    sde = SDES[sde_name]
    model = MixtureModel(MIXTURE, sde)
    x = 2.0 * torch.randn(16, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for t in (0.05, 0.3, 0.6, 0.9):
        tt = _t(t).expand(16)
        xg = x.clone().requires_grad_(True)
        pred = model(xg, tt)
        u = velocity(sde, tt, pred.x0, pred.eps)
        div = sum(torch.autograd.grad(u[:, i].sum(), xg, retain_graph=True)[0][:, i] for i in range(3))
        grad_logp = torch.autograd.grad(_log_p(sde, xg, t).sum(), xg)[0]
        h = 1e-5
        dlogp_dt = (_log_p(sde, x, t + h) - _log_p(sde, x, t - h)) / (2 * h)
        residual = (dlogp_dt + div + (u * grad_logp).sum(1)).detach()
        scale = float(dlogp_dt.abs().max() + div.detach().abs().max()) + 1.0
        assert float(residual.abs().max()) < 1e-6 * scale, (t, residual)


def test_mixture_velocity_on_the_linear_path_is_the_conditional_mean_of_eps_minus_x0():
    """Monte Carlo: E[(eps - x0 - u(x_t)) h(x_t)] = 0 for test functions h (u is the regression of
    eps - x0 on x_t), here h = 1, x_t and its square, at t = 0.4; and the exact velocity's closed form
    on the linear path is (x - E[x0|x]) / t (eps = (x - (1 - t) x0) / t)."""
    sde = LinearSDE()
    model = MixtureModel(MIXTURE, sde)
    n, t = 400_000, 0.4
    g = torch.Generator().manual_seed(0)
    k = torch.multinomial(MIXTURE.log_weights.exp(), n, replacement=True, generator=g)
    chol = torch.linalg.cholesky(torch.tensor([[[0.5, 0.3, -0.1], [0.3, 0.4, 0.05], [-0.1, 0.05, 0.3]],
                                               [[0.2, 0.0, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 0.3]],
                                               [[0.25, 0.0, 0.0], [0.0, 0.25, 0.0], [0.0, 0.0, 0.25]]], dtype=torch.float64))  # fmt: skip
    x0 = MIXTURE.means[k] + (chol[k] @ torch.randn(n, 3, 1, generator=g, dtype=torch.float64)).squeeze(-1)
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
    xt = (1 - t) * x0 + t * eps
    pred = model(xt, _t(t))
    u = velocity(sde, _t(t).expand(n), pred.x0, pred.eps)
    torch.testing.assert_close(u, (xt - pred.x0) / t)
    resid = eps - x0 - u
    for h in (torch.ones_like(xt), xt, xt * xt):
        m = resid * h
        err = m.mean(0).abs()
        assert bool((err < 5 * m.std(0) / math.sqrt(n)).all()), (err, m.std(0) / math.sqrt(n))


# ----------------------------------------------------------------------- the objective
C, M, DIM = 0.7, 0.3, 8


def _gaussian(sde):
    """model=gmm with one component N(M, C^2 I) in DIM dimensions: its exact prediction."""
    return MixtureModel(GaussianMixture(means=[[M] * DIM], scales=C), sde)


def _irreducible(sde, t):
    """min over u_hat of E||u - u_hat(x_t)||^2 / DIM for x0 ~ N(M, C^2): Var(u | x_t) of the jointly
    Gaussian (u, x_t), = det^2 C^2 / (alpha^2 C^2 + sigma^2), det = alpha sigma' - sigma alpha'."""
    t = _t(t)
    a, s, da, ds = sde.alpha(t), sde.sigma(t), sde.alpha_dot(t), sde.sigma_dot(t)
    return float((a * ds - s * da) ** 2 * C**2 / (a * a * C**2 + s * s))


class Shifted:
    """A model whose velocity is the exact one plus `shift` (through the flow parameterization)."""

    def __init__(self, inner, shift):
        self.inner, self.shift, self.sde = inner, shift, inner.sde

    def __call__(self, x, t, cond=None):
        pred = self.inner(x, t, cond)
        a, s = broadcast(self.sde.alpha(t), x), broadcast(self.sde.sigma(t), x)
        da, ds = broadcast(self.sde.alpha_dot(t), x), broadcast(self.sde.sigma_dot(t), x)
        u = velocity(self.sde, t, pred.x0, pred.eps) + self.shift
        x0, eps = split_velocity(u, x, a, s, da, ds)
        return Prediction(x0=x0, eps=eps, sigma=s)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_flow_loss_of_the_exact_velocity_is_the_irreducible_value(sde_name):
    """With model=gmm's exact prediction the flow loss equals the time average of the irreducible
    Var(u | x_t) (computed from the joint Gaussian, integrated by scipy over U[eps, T]), within 5
    standard errors; a velocity shifted by d per pixel costs d^2 more (the cross term averages out)."""
    sde = SDES[sde_name]
    n = 8192
    x0 = M + C * torch.randn(n, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    objective = FlowObjective(sde)
    exact = _gaussian(sde)
    per_sample = _per_sample_losses(objective, exact, x0)
    expected = integrate.quad(lambda t: _irreducible(sde, t), sde.eps, sde.T, limit=200)[0] / (sde.T - sde.eps)
    se = float(per_sample.std()) / math.sqrt(n)
    assert abs(float(per_sample.mean()) - expected) < 5 * se, (float(per_sample.mean()), expected, se)
    assert float(objective.loss(exact, x0, None, _rng(n))) == pytest.approx(float(per_sample.mean()), rel=1e-12)
    d = 0.1 * math.sqrt(expected)
    shifted = float(objective.loss(Shifted(exact, d), x0, None, _rng(n)))
    assert shifted - float(per_sample.mean()) == pytest.approx(d * d, rel=0.2)


def _per_sample_losses(objective, model, x0):
    """The objective's loss per sample, written out: its draws (t, then the noise) from the same rng."""
    rng = _rng(x0.shape[0])
    t = objective.times(rng, x0.shape[0]).to(x0.dtype)
    noise = rng.randn(x0.shape, x0.dtype)
    pred = model(objective.sde.marginal(x0, t, noise), t)
    return (velocity(objective.sde, t, pred.x0, pred.eps) - velocity(objective.sde, t, x0, noise)).pow(2).mean(1)


def test_flow_loss_on_the_linear_path_is_the_mse_to_eps_minus_x0():
    """On sde=linear the loss is mean ||u_hat - (eps - x0)||^2, u_hat = eps_hat - x0_hat, written by hand
    with the objective's draws: t ~ the stratified U[eps, T] of objectives.base.sample_times, then the noise."""
    sde = LinearSDE()
    n = 64
    x0 = M + C * torch.randn(n, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = Shifted(_gaussian(sde), 0.05)
    rng = _rng(n)
    t = sample_times(sde, rng, n).to(x0.dtype)
    noise = rng.randn(x0.shape, x0.dtype)
    xt = (1 - t[:, None]) * x0 + t[:, None] * noise
    pred = model(xt, t)
    expected = ((pred.eps - pred.x0) - (noise - x0)).pow(2).mean(1).mean()
    got = FlowObjective(sde).loss(model, x0, None, _rng(n))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_logit_normal_times_have_sd3_density_mapped_into_eps_T():
    """time_sampling=logit_normal: r = (t - eps)/(T - eps) has logit(r) ~ N(m, s^2) (KS test on the
    stratified draws, which match N(m, s^2) far better than iid ones); uniform draws sample_times' t."""
    sde = LinearSDE()
    n = 4096
    objective = FlowObjective(sde, time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = objective.times(_rng(n), n)
    assert bool((t > sde.eps).all() and (t < sde.T).all())
    r = (t - sde.eps) / (sde.T - sde.eps)
    logit = torch.log(r / (1 - r)).numpy()
    assert stats.kstest(logit, "norm", args=(0.5, 0.8)).pvalue > 0.5
    assert abs(float(np.mean(logit)) - 0.5) < 0.01 and abs(float(np.std(logit)) - 0.8) < 0.01
    torch.testing.assert_close(FlowObjective(sde).times(_rng(n), n), sample_times(sde, _rng(n), n), rtol=0, atol=0)
    with pytest.raises(ValueError, match="time_sampling"):
        FlowObjective(sde, time_sampling="normal")
    with pytest.raises(ValueError, match="logit_std"):
        FlowObjective(sde, time_sampling="logit_normal", logit_std=0.0)


# --------------------------------------------------------------------- rectified flow's Euler
def _velocity_of(model, x, t):
    tt = _t(t).expand(x.shape[0])
    pred = model(x, tt)
    return velocity(model.sde, tt, pred.x0, pred.eps)


@pytest.mark.parametrize("spacing", ["uniform", "trailing", "karras"])
def test_ode_euler_on_linear_is_rectified_flow_euler(spacing):
    """ode solver=euler on sde=linear, from the prior draw x_T: rectified flow's Euler in x,
    x_{t'} = x_t + (t' - t) u(x_t, t), through the sampler's levels and a last step to t = 0."""
    from diffctl.samplers.common import noise_levels, ratio_levels

    sde = LinearSDE()
    model = MixtureModel(MIXTURE, sde)
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    times = ratio_levels(sde, 12, "karras") if spacing == "karras" else noise_levels(sde, 12, spacing)
    x = x_T.clone()
    grid = [*times.tolist(), 0.0]
    for now, nxt in zip(grid, grid[1:]):
        x = x + (nxt - now) * _velocity_of(model, x, now)
    torch.testing.assert_close(ode(model, x_T, 12, solver="euler", spacing=spacing), x, rtol=1e-10, atol=1e-10)


def test_ode_euler_on_linear_matches_diffusers_flow_match_euler_step_by_step():
    """diffusers' FlowMatchEulerDiscreteScheduler (shift 1) on our levels (its sigmas are our t, with its
    terminal 0 appended), driven by the exact velocity: every step, and the end point, agree with our
    ode solver=euler to diffusers' float32 arithmetic."""
    FlowMatchEulerDiscreteScheduler = pytest.importorskip("diffusers").FlowMatchEulerDiscreteScheduler
    from diffctl.samplers.common import Level, noise_levels
    from diffctl.samplers.ode import _euler_step

    sde = LinearSDE()
    model = MixtureModel(MIXTURE, sde)
    times = noise_levels(sde, 10, "uniform")
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=times.tolist())
    np.testing.assert_allclose(sched.sigmas.double().numpy(), [*times.tolist(), 0.0], rtol=1e-6, atol=1e-7)
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    theirs, y = x_T.float(), x_T / Level(sde, sde.T).alpha  # ours walks y = x/alpha
    for i, timestep in enumerate(sched.timesteps):
        t_now = float(sched.sigmas[i])
        theirs = sched.step(_velocity_of(model, theirs.double(), t_now).float(), timestep, theirs).prev_sample
        now = Level(sde, float(times[i]))
        if i + 1 < len(times):  # ours, in y = x/alpha: the same step
            nxt = Level(sde, float(times[i + 1]))
            y = _euler_step(model, y, now, nxt, None)
            torch.testing.assert_close(nxt.alpha * y, theirs.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ode(model, x_T, 10, solver="euler", spacing="uniform"), theirs.double(), rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------- the CLI
def test_train_linear_flow_then_sample(tmp_path):
    """`diffctl train sde=linear objective=flow` for 3 steps (the network outputs the velocity;
    logit-normal times), then `diffctl sample` from its checkpoint with rectified flow's Euler
    (in-process) and with pc (the CLI, as a user runs it)."""
    run_dir = tmp_path / "run"
    run_train(run_dir, [*tiny_overrides("unet"), "sde=linear", "objective=flow", "objective.time_sampling=logit_normal"])
    saved = load_ckpt(run_dir / "checkpoints" / "last.ckpt")["hyper_parameters"]
    text = json.dumps(saved, default=str)
    assert "diffctl.sde.LinearSDE" in text and "diffctl.objectives.FlowObjective" in text
    run_sample(tmp_path / "euler", [f"ckpt={run_dir}", "sampler=ode", "sampler.solver=euler", "steps=3", "num_samples=3", "batch_size=3", "metrics.names=[]"])
    out = run_cli(["sample", f"ckpt={run_dir}", "sampler=pc", "steps=3", "num_samples=3", "batch_size=3", "metrics.names=[]",
                   "progress_bar=false", f"hydra.run.dir={tmp_path / 'pc'}"], tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("euler", "pc"):
        samples = np.load(tmp_path / name / "samples.npz")["samples"]
        assert samples.shape == (3, 8, 8, 1) and samples.dtype == np.uint8


def test_sample_gmm_on_linear_through_the_cli(tmp_path):
    """`diffctl sample model=gmm sde=linear`: the exact mixture on the linear path, sampled and scored
    against its exact distribution; the in-process run with the same seed gives the same samples."""
    args = ["model=gmm", "sde=linear", "steps=20", "num_samples=64", "batch_size=64", "progress_bar=false"]
    out = run_cli(["sample", *args, f"hydra.run.dir={tmp_path / 'cli'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["num_samples"] == 64 and metrics["sw2"] < 1.5 * metrics["sw2_floor"]  # as close as 64 exact draws
    samples = np.load(tmp_path / "cli" / "samples.npz")["samples"]
    run_sample(tmp_path / "here", args)
    np.testing.assert_array_equal(samples, np.load(tmp_path / "here" / "samples.npz")["samples"])
