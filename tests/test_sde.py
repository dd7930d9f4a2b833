"""SDE marginals against closed forms, the forward SDE itself, and DDPM's discrete schedule."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from diffctl.sde import SubVPSDE, VESDE, VPSDE, ddpm_alphas_cumprod, ddpm_betas

SDES = {
    "vp": lambda: VPSDE(0.1, 20.0),
    "vpsub": lambda: SubVPSDE(0.1, 20.0),
    "ve": lambda: VESDE(0.01, 50.0),
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
    """alpha_bar_i of DDPM's 1000 linear betas equals alpha(t_i)^2 of the VP SDE at t_i=(i+1)/N."""
    n = 1000
    betas = ddpm_betas(n, 1e-4, 0.02)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    alphas_cumprod = ddpm_alphas_cumprod(betas)
    reference = np.cumprod(1 - np.linspace(1e-4, 0.02, n))
    np.testing.assert_allclose(alphas_cumprod.numpy(), reference, rtol=1e-12)
    sde = VPSDE(beta_min=1e-4 * n, beta_max=0.02 * n)
    t = torch.arange(1, n + 1) / n
    continuous = sde.alpha(t) ** 2
    assert torch.max(torch.abs(continuous - alphas_cumprod)) < 2e-3
    # Discretization error shrinks as the step count grows (same beta(t), finer steps).
    fine = 10_000
    fine_betas = ddpm_betas(fine, 0.1 / fine, 20.0 / fine)
    fine_err = torch.max(torch.abs(sde.alpha(torch.arange(1, fine + 1) / fine) ** 2 - ddpm_alphas_cumprod(fine_betas)))
    assert fine_err < torch.max(torch.abs(continuous - alphas_cumprod)) / 5


@pytest.mark.parametrize("name", list(SDES))
def test_prior_sample_and_logp(name):
    sde = SDES[name]()
    z = sde.prior_sample((4, 3, 2, 2), generator=torch.Generator().manual_seed(1))
    std = sde.prior_std()
    expected = torch.distributions.Normal(0.0, std).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(sde.prior_logp(z), expected)
    # The prior is the t=1 marginal for data near 0.
    assert float(sde.sigma(torch.tensor(1.0))) == pytest.approx(std, rel=1e-3)


@pytest.mark.parametrize("name", list(SDES))
def test_time_from_noise_ratio_inverts(name):
    sde = SDES[name]()
    t = torch.tensor([sde.eps, 1e-3, 0.2, 0.6, 1.0])
    torch.testing.assert_close(sde.t_from_noise_ratio(sde.noise_ratio(t)), t, rtol=1e-8, atol=1e-10)


def test_invalid_parameters_raise():
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPSDE(20.0, 0.1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(50.0, 0.01)
    with pytest.raises(ValueError, match="eps"):
        VPSDE(eps=0.0)
