"""Classifier guidance against the analytic Gaussian mixture (issue 16, section 2, "Ground truth").

The exact noise-conditional classifier of a mixture is its component posterior p(k | x_t). What
the tests compare with comes from routes that share nothing with diffctl/guidance.py:
- the posterior and log-densities of diffctl/networks/gmm.py (its own softmax / logsumexp code);
- the class-conditional score of gmm.py's conditional denoiser (components masked out), for the
  closed-form classifier gradient and, path by path, for guided sampling at scale 1;
- central finite differences of log [p_t(x) p_t(k | x)^s] built from gmm.py's log-densities,
  for the guided score at scale s;
- exact moments of component k, and quadrature on a numerically normalized 1-D density, for
  sample statistics (z-tests sized by the sample, Bonferroni over each test's statistics).

What sampling with s != 1 gives (measured here, 1-D mixture below, k = 1, s = 3, n = 4000):
the tilted data density p(x) p(k | x)^3 has mean 1.023; ddpm (200 steps) samples mean 1.30-1.33
and the PF-ODE (dpmpp_2m, 50 steps) 1.71, z = 34-118 on the first three moments, on VP and VE
alike. The guided score is exactly grad log [p_t p_t(k | .)^s] at every level (tested), but those
tilted marginals are not one diffusion's marginals, so neither the reverse SDE nor the ODE carries
the tilted density of one level to that of the next (Bradley & Nakkiran 2024, "Classifier-free
guidance is a predictor-corrector"). A Langevin chain at one level does sample that level's tilted
density (tested) - it only needs the score there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffctl.denoiser import GuidedDenoiser
from diffctl.errors import ConfigError
from diffctl.guidance import ClassifierGuided, ExactMixtureClassifier, check_labels, classifier_grad
from diffctl.networks.gmm import GaussianMixture, MixtureDenoiser
from diffctl.samplers import generate
from diffctl.sde import SubVPSDE, VESDE, VPSDE

D = 3
MIXTURE = GaussianMixture(  # tests/test_ground_truth.py's mixture: unequal weights, one full covariance
    means=[[-2.0, 0.5, 0.0], [1.5, 1.5, -0.5], [1.0, -2.0, 1.0]],
    covariances=[
        [[0.5, 0.3, -0.1], [0.3, 0.4, 0.05], [-0.1, 0.05, 0.3]],
        [[0.2, 0.0, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 0.3]],
        [[0.25, 0.0, 0.0], [0.0, 0.25, 0.0], [0.0, 0.0, 0.25]],
    ],
    weights=[0.5, 0.3, 0.2],
)
PLANE = GaussianMixture(  # 2-D, for the finite-difference check of the guided score
    means=[[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]],
    covariances=[[[0.4, 0.15], [0.15, 0.3]], [[0.2, 0.0], [0.0, 0.5]], [[0.3, 0.0], [0.0, 0.3]]],
    weights=[0.5, 0.3, 0.2],
)
LINE = GaussianMixture(means=[[-1.5], [1.0]], scales=[0.4, 0.6], weights=[0.6, 0.4])  # 1-D: quadrature
SDES = {"vp": VPSDE(), "vpsub": SubVPSDE(), "ve": VESDE(sigma_max=100.0)}


def _t(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64)


def _guided(mixture, sde, scale: float) -> ClassifierGuided:
    """Guidance of the UNCONDITIONAL exact mixture by its exact classifier."""
    return ClassifierGuided(MixtureDenoiser(mixture, sde), ExactMixtureClassifier(mixture, sde), scale)


def _cond(labels: torch.Tensor) -> dict:
    return {"class_label": labels}


# ------------------------------------------------------------------- 1. the exact classifier
@pytest.mark.parametrize("sde_name", list(SDES))
def test_exact_classifier_is_the_mixture_posterior(sde_name):
    sde, g = SDES[sde_name], torch.Generator().manual_seed(0)
    clf = ExactMixtureClassifier(MIXTURE, sde)
    x = 2.0 * torch.randn(256, D, generator=g, dtype=torch.float64)
    t = torch.rand(256, generator=g, dtype=torch.float64).clamp_min(sde.eps)
    logp = clf.log_probs(x, t)
    assert clf.num_classes == 3 and logp.shape == (256, 3)
    torch.testing.assert_close(logp.exp(), MIXTURE.responsibilities(x, sde.alpha(t), sde.sigma(t)), rtol=1e-10, atol=1e-12)
    # far from every component the log-probabilities stay finite (a log of a softmax would give -inf)
    assert torch.isfinite(clf.log_probs(torch.full((1, D), 40.0, dtype=torch.float64), _t(sde.eps))).all()


@pytest.mark.parametrize("sde_name", list(SDES))
def test_classifier_grad_by_autograd_equals_the_closed_form_under_inference_mode(sde_name):
    """classifier_grad (autograd) against grad_log_prob (closed form), called the way the samplers
    call models: under torch.inference_mode, on float32 inference tensors as well as float64."""
    sde, g = SDES[sde_name], torch.Generator().manual_seed(1)
    clf = ExactMixtureClassifier(MIXTURE, sde)
    x = 2.0 * torch.randn(128, D, generator=g, dtype=torch.float64)
    t = torch.rand(128, generator=g, dtype=torch.float64).clamp_min(sde.eps)
    labels = torch.randint(0, 3, (128,), generator=g)
    exact = clf.grad_log_prob(x, t, labels)
    with torch.inference_mode():
        g64 = classifier_grad(clf, x.clone(), t.clone(), labels.clone())
        g32 = classifier_grad(clf, x.float(), t.float(), labels)
    torch.testing.assert_close(g64, exact, rtol=1e-10, atol=1e-10)
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_closed_form_gradient_is_the_class_conditional_minus_the_unconditional_score(sde_name):
    """grad log p(k | x_t) = grad log p_t(x | k) - grad log p_t(x), each score -eps/sigma from gmm.py's
    own denoiser (conditional: the other components masked out)."""
    sde, g = SDES[sde_name], torch.Generator().manual_seed(2)
    x = 2.0 * torch.randn(128, D, generator=g, dtype=torch.float64)
    t = torch.rand(128, generator=g, dtype=torch.float64).clamp_min(sde.eps)
    labels = torch.randint(0, 3, (128,), generator=g)
    sigma = sde.sigma(t)[:, None]
    own = MixtureDenoiser(MIXTURE, sde, conditional=True)(x, t, labels).eps
    every = MixtureDenoiser(MIXTURE, sde)(x, t).eps
    expected = -(own - every) / sigma
    got = ExactMixtureClassifier(MIXTURE, sde).grad_log_prob(x, t, labels)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-7 * float(expected.abs().max()))


# ------------------------------------------------- 2. the guided score is that of the tilted density
def _log_tilted(mixture, x: torch.Tensor, alpha: float, sigma: float, k: int, s: float) -> torch.Tensor:
    """log p_t(x) + s log p_t(k | x), from gmm.py: log p(k | x) = log [w_k p_t(x | k)] - log p_t(x),
    the first a logsumexp over component k alone (the mixture's label mask)."""
    labels = torch.full((x.shape[0],), k)
    logp = mixture.log_prob(x, alpha, sigma)
    return logp + s * (mixture.log_prob(x, alpha, sigma, labels=labels) - logp)


LEVELS = (None, 0.05, 0.2, 0.5, 1.0)  # None: the SDE's sample_eps, the last level a sampler visits


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_guided_score_is_the_gradient_of_log_p_times_classifier_to_the_s(sde_name, scale):
    """On a 2-D grid (41 x 41 nodes over [-4, 4]^2), at five levels from sample_eps to T and for every
    target k: -eps_g / sigma of the guided unconditional mixture equals the central finite difference
    (h = 1e-4, error ~1e-8 here) of log q, q = p_t(x) p_t(k | x)^s normalized numerically on the grid
    (the normalizer drops out of a log-derivative; it is kept so q is the density the statement is
    about). Tolerance 1e-5 relative to the largest score on the grid."""
    sde, h = SDES[sde_name], 1e-4
    axis = torch.linspace(-4.0, 4.0, 41, dtype=torch.float64)
    nodes = torch.cartesian_prod(axis, axis)
    area = float(axis[1] - axis[0]) ** 2
    model = _guided(PLANE, sde, scale)
    for level in LEVELS:
        t = sde.sample_eps if level is None else level
        alpha, sigma = float(sde.alpha(_t(t))), float(sde.sigma(_t(t)))
        for k in range(3):
            log_q = _log_tilted(PLANE, nodes, alpha, sigma, k, scale)
            log_z = float(torch.logsumexp(log_q, 0)) + math.log(area)
            fd = torch.stack([
                (_log_tilted(PLANE, nodes + h * e, alpha, sigma, k, scale) - _log_tilted(PLANE, nodes - h * e, alpha, sigma, k, scale)) / (2 * h)
                for e in torch.eye(2, dtype=torch.float64)
            ], dim=1)  # fmt: skip  (log_z cancels in the difference)
            assert math.isfinite(log_z)
            with torch.inference_mode():
                pred = model(nodes.clone(), torch.full((len(nodes),), t, dtype=torch.float64), _cond(torch.full((len(nodes),), k)))
            score = -pred.eps / pred.sigma
            err = float((score - fd).abs().max())
            assert err <= 1e-5 * float(fd.abs().max()), f"{sde_name} t={t} k={k} s={scale}: |score - fd| = {err:.3e}"
            # and x0 agrees with eps: x = alpha x0 + sigma eps (Tweedie for the tilted density)
            torch.testing.assert_close(alpha * pred.x0 + pred.sigma * pred.eps, nodes, rtol=1e-9, atol=1e-9)
