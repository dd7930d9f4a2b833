"""SDE marginals against closed forms, the forward SDE itself, and DDPM's discrete schedule."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from diffctl.sde import SDE, LinearSDE, SubVPSDE, VESDE, VPSDE, ddpm_alphas_cumprod, ddpm_betas

SDES = {
    "vp": lambda: VPSDE(0.1, 20.0),
    "vpsub": lambda: SubVPSDE(0.1, 20.0),
    "ve": lambda: VESDE(0.01, 50.0),
    "linear": lambda: LinearSDE(),
}
TIMES = torch.tensor([1e-4, 0.01, 0.1, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)


@pytest.fixture(autouse=True)
def float64():
    """These tests compare against closed forms to ~1e-12: run them in double precision."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_vp_marginal_matches_numerical_integral_of_beta():
    sde = VPSDE(0.1, 20.0)
    for t in TIMES.tolist():
        integral, _ = integrate.quad(lambda s: 0.1 + s * (20.0 - 0.1), 0.0, t)
        alpha = math.exp(-0.5 * integral)
        assert float(sde.alpha(torch.tensor(t))) == pytest.approx(alpha, rel=1e-12)
        assert float(sde.sigma(torch.tensor(t))) == pytest.approx(math.sqrt(1 - alpha**2), rel=1e-10)
        sub = SubVPSDE(0.1, 20.0)
        assert float(sub.sigma(torch.tensor(t))) == pytest.approx(1 - alpha**2, rel=1e-10)


def test_ve_sigma_is_geometric():
    sde = VESDE(0.01, 50.0)
    assert float(sde.sigma(torch.tensor(0.0))) == pytest.approx(0.01)
    assert float(sde.sigma(torch.tensor(1.0))) == pytest.approx(50.0)
    assert float(sde.sigma(torch.tensor(0.5))) == pytest.approx(math.sqrt(0.01 * 50.0))
    assert torch.all(sde.alpha(TIMES) == 1)


@pytest.mark.parametrize("name", list(SDES))
def test_moment_odes_hold(name):
    """For linear drift f = a(t) x the perturbation kernel obeys d alpha/dt = a alpha and
    d sigma^2/dt = 2 a sigma^2 + g^2. Checks alpha, sigma, drift and diffusion agree."""
    sde = SDES[name]()
    t = TIMES[1:-1].clone().requires_grad_(True)
    alpha, var = sde.alpha(t), sde.sigma(t) ** 2
    # VE's alpha is the constant 1 (no graph): its derivative is 0.
    d_alpha = torch.autograd.grad(alpha.sum(), t, retain_graph=True)[0] if alpha.requires_grad else torch.zeros_like(t)
    d_var = torch.autograd.grad(var.sum(), t)[0]
    a = sde.drift(torch.ones_like(t), t.detach())  # drift of x=1 is a(t)
    g2 = sde.diffusion(t.detach()) ** 2
    torch.testing.assert_close(d_alpha, a * alpha.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(d_var, 2 * a * var.detach() + g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(SDES))
def test_forward_sde_simulation_matches_marginal(name):
    """Euler-Maruyama simulation of dx = f dt + g dw from fixed x0 reaches N(alpha x0, sigma^2)."""
    sde = SDES[name]()
    gen = torch.Generator().manual_seed(0)
    n, steps, t_end = 50_000, 500, 0.7
    x0 = torch.tensor(0.8)
    x = torch.full((n,), float(x0))
    ts = torch.linspace(0.0, t_end, steps + 1)
    for i in range(steps):
        t, dt = ts[i].expand(n), float(ts[i + 1] - ts[i])
        x = x + sde.drift(x, t) * dt + sde.diffusion(t) * math.sqrt(dt) * torch.randn(n, generator=gen)
    mean, std = float(sde.alpha(torch.tensor(t_end)) * x0), float(sde.sigma(torch.tensor(t_end)))
    # 5 standard errors of the mean/variance estimators, plus O(dt) discretization bias.
    assert abs(float(x.mean()) - mean) < 5 * std / math.sqrt(n) + 2e-3 * max(std, 1)
    assert abs(float(x.std()) - std) < 5 * std / math.sqrt(2 * n) + 2e-3 * std


def test_ddpm_discrete_schedule_is_the_vp_discretization():
    """alpha_bar_i of DDPM's 1000 linear betas against alpha(t_i)^2 of the VP SDE at t_i=(i+1)/N, in
    the variable samplers use, s = sigma/alpha, relatively: at the first steps s is small and an
    absolute comparison of alpha_bar cannot see it. VP integrates beta(t) over [0, 1/N] where DDPM
    takes beta(0)/N, so (to first order) the VP's s^2 there is 1 + (beta_max - beta_min)/(2 N beta_min)
    times DDPM's: s is sqrt(1.0995) - 1 = 4.86% above at N = 1000, and the gap is O(1/N)."""
    n = 1000
    betas = ddpm_betas(n, 1e-4, 0.02)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    alphas_cumprod = ddpm_alphas_cumprod(betas)
    reference = np.cumprod(1 - np.linspace(1e-4, 0.02, n))
    np.testing.assert_allclose(alphas_cumprod.numpy(), reference, rtol=1e-12)

    def relative_s_gap(steps):
        """s of the continuous VP (from scipy's integral of beta) over s of DDPM's chain, minus 1."""
        vp_var = [-math.expm1(-integrate.quad(lambda u: 0.1 + u * 19.9, 0.0, (i + 1) / steps)[0]) for i in range(steps)]
        ddpm_abar = np.cumprod(1 - np.linspace(0.1 / steps, 20.0 / steps, steps))
        s_vp = np.sqrt(np.array(vp_var) / (1 - np.array(vp_var)))
        return s_vp / np.sqrt((1 - ddpm_abar) / ddpm_abar) - 1

    sde = VPSDE(beta_min=1e-4 * n, beta_max=0.02 * n)
    t = torch.arange(1, n + 1) / n
    ours = (sde.noise_ratio(t) / ((1 - alphas_cumprod) / alphas_cumprod).sqrt() - 1).numpy()
    gap = relative_s_gap(n)
    np.testing.assert_allclose(ours, gap, rtol=1e-6, atol=1e-9)  # the code's s against scipy's and numpy's
    assert gap[0] == pytest.approx(math.sqrt(1 + 19.9 / (2 * n * 0.1)) - 1, abs=1e-4)  # measured 0.04855
    assert np.abs(gap).max() < 0.05  # largest at the first step; -3.3% at the last
    # Same beta(t), 10x finer steps: the relative gap shrinks 10x (first order).
    assert np.abs(relative_s_gap(10 * n)).max() < np.abs(gap).max() / 9.5


@pytest.mark.parametrize("name", list(SDES))
def test_prior_sample_and_logp(name):
    sde = SDES[name]()
    z = sde.prior_sample((4, 3, 2, 2), generator=torch.Generator().manual_seed(1))
    std = sde.prior_std()
    expected = torch.distributions.Normal(0.0, std).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(sde.prior_logp(z), expected)
    # The prior is the t=T marginal for data near 0.
    assert float(sde.sigma(torch.tensor(sde.T))) == pytest.approx(std, rel=1e-3)


@pytest.mark.parametrize("name", list(SDES))
def test_time_from_noise_ratio_inverts(name):
    sde = SDES[name]()
    t = torch.tensor([sde.eps, 1e-3, 0.2, 0.6, sde.T])
    torch.testing.assert_close(sde.t_from_noise_ratio(sde.noise_ratio(t)), t, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(SDES))
def test_alpha_and_sigma_rates_match_finite_differences_and_the_sde(name):
    """Each SDE's closed-form alpha'(t), sigma'(t) against central differences of alpha, sigma and
    against the identities alpha' = f alpha, sigma' = (g^2/2 + f sigma^2)/sigma (SDE's defaults)."""
    sde = SDES[name]()
    t, h = TIMES[1:-1], 1e-6
    for rate, fun in ((sde.alpha_dot, sde.alpha), (sde.sigma_dot, sde.sigma)):
        torch.testing.assert_close(rate(t), (fun(t + h) - fun(t - h)) / (2 * h), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sde.alpha_dot(t), SDE.alpha_dot(sde, t), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sde.sigma_dot(t), SDE.sigma_dot(sde, t), rtol=1e-10, atol=1e-12)


def test_linear_path_closed_forms():
    """alpha = 1 - t, sigma = t, alpha' = -1, sigma' = 1; the path ends at t_max, and s(T) = T/(1 - T)."""
    sde = LinearSDE(t_max=0.995)
    t = TIMES[:-1]
    assert torch.equal(sde.alpha(t), 1 - t) and torch.equal(sde.sigma(t), t)
    assert torch.equal(sde.alpha_dot(t), -torch.ones_like(t)) and torch.equal(sde.sigma_dot(t), torch.ones_like(t))
    assert sde.T == 0.995 and float(sde.noise_ratio(torch.tensor(sde.T))) == pytest.approx(199.0, rel=1e-12)
    torch.testing.assert_close(sde.drift(torch.ones_like(t), t), -1 / (1 - t))
    torch.testing.assert_close(sde.diffusion(t), torch.sqrt(2 * t / (1 - t)))
    for bad in (1.0, 0.0):
        with pytest.raises(ValueError, match="t_max"):
            LinearSDE(t_max=bad)
    with pytest.raises(ValueError, match=r"sample_eps must be in \[eps, T\)"):
        LinearSDE(sample_eps=0.995)


def test_invalid_parameters_raise():
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPSDE(20.0, 0.1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(50.0, 0.01)
    with pytest.raises(ValueError, match="eps"):
        VPSDE(eps=0.0)
