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

from diffctl.denoiser import GuidedModel
from diffctl.errors import ConfigError
from diffctl.guidance import ClassifierGuided, ExactMixtureClassifier, check_labels, classifier_grad
from diffctl.networks.gmm import GaussianMixture, MixtureModel
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
    return ClassifierGuided(MixtureModel(mixture, sde), ExactMixtureClassifier(mixture, sde), scale)


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
    own = MixtureModel(MIXTURE, sde, conditional=True)(x, t, _cond(labels)).eps
    every = MixtureModel(MIXTURE, sde)(x, t).eps
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


# ------------------------------------------------ 3. scale 1: guided sampling samples component k
PATH_CASES = [({"name": "ddpm"}, 20), ({"name": "ddim"}, 20), ({"name": "pc"}, 20), ({"name": "ode"}, 20), ({"name": "ode", "solver": "heun"}, 10)]


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: "-".join(map(str, c[0].values())))
def test_scale_one_guidance_is_the_class_conditional_sampler_path_by_path(sde_name, case):
    """At s = 1 the guided score of the unconditional mixture is the score of component k, so with the
    same noise every sampler's path is that of gmm.py's class-conditional denoiser (float32 sampling)."""
    spec, steps = case
    sde, n = SDES[sde_name], 64
    labels = torch.arange(n) % 3
    guided = generate(_guided(MIXTURE, sde, 1.0), n, (D,), spec, steps, seed=2, cond=_cond(labels))
    conditional = generate(MixtureModel(MIXTURE, sde, conditional=True), n, (D,), spec, steps, seed=2, cond=_cond(labels))
    torch.testing.assert_close(guided, conditional, rtol=1e-4, atol=1e-4)


# Per component k (labels i % 3, 2000 samples each): x (-> mu_k) and (x - mu_k)_j (x - mu_k)_l
# (-> Sigma_k entries); pooled over all samples: the posterior of the EQUAL-weight mixture, whose
# mean under that mixture is exactly 1/3 per component (the balanced labels make the pooled sample
# that mixture, stratified, so its iid standard error is an upper bound). The per-component mean of a
# far component's posterior would be a poor statistic: it is ~1e-4 with rare values near 1.
_IU = torch.triu_indices(D, D)
COMPONENTS = [GaussianMixture(means=[MIXTURE.means[k].tolist()], covariances=[MIXTURE.covariances()[k].tolist()]) for k in range(3)]
EQUAL = GaussianMixture(means=MIXTURE.means.tolist(), covariances=MIXTURE.covariances().tolist())
STAT_NAMES = [f"k{k} {n}" for k in range(3) for n in [f"mean[{j}]" for j in range(D)] + [f"cov[{j},{l}]" for j, l in _IU.T.tolist()]]
STAT_NAMES += [f"weight[{k}]" for k in range(3)]


def _component_stats(x: torch.Tensor, k: int) -> torch.Tensor:
    xc = x - MIXTURE.means[k]
    return torch.cat([x, xc[:, _IU[0]] * xc[:, _IU[1]]], dim=1)


def _exact_and_std() -> tuple[torch.Tensor, torch.Tensor]:
    """Exact expectations; standard deviations from 400k exact draws of each component (and of the
    equal-weight mixture), whose own error (~0.2%) is immaterial to the tolerance."""
    exact, std = [], []
    for k, comp in enumerate(COMPONENTS):
        exact.append(torch.cat([MIXTURE.means[k], MIXTURE.covariances()[k][_IU[0], _IU[1]]]))
        std.append(_component_stats(comp.sample(400_000, torch.Generator().manual_seed(k))[0], k).std(0))
    exact.append(torch.full((3,), 1 / 3, dtype=torch.float64))
    std.append(EQUAL.responsibilities(EQUAL.sample(400_000, torch.Generator().manual_seed(9))[0]).std(0))
    return torch.cat(exact), torch.cat(std)


# First-order samplers at twice test_ground_truth's steps: on a single component their O(1/steps)
# variance bias is the larger part (measured, n=2000 per component, max |z| on vp / ve: ddpm 4.9 / 3.2
# at 100 steps, 3.45 / 3.1 at 200; ddim 5.2 / 4.5 at 50, 3.6 / 3.2 at 100, 2.75 / 2.56 at 200; pc 4.8 / 5.8
# at 50, 2.2 / 3.4 at 100; ode 2.3 / 2.5 at 50; Z_CRIT 4.10), the bias the class-conditional mixture
# sampler has as well (the path test above).
SAMPLE_CASES = [({"name": "ddpm"}, 200), ({"name": "ddim"}, 200), ({"name": "pc"}, 100), ({"name": "ode"}, 50)]
SAMPLE_SDES = ("vp", "ve")
Z_CRIT = float(norm.isf(0.01 / (2 * len(SAMPLE_CASES) * len(SAMPLE_SDES) * len(STAT_NAMES))))
EXACT, STD = _exact_and_std()


@pytest.mark.parametrize("sde_name", SAMPLE_SDES)
@pytest.mark.parametrize("case", SAMPLE_CASES, ids=lambda c: "-".join(map(str, c[0].values())))
def test_scale_one_guided_unconditional_mixture_samples_component_k(sde_name, case):
    """z = (sample statistic - exact) / (its std / sqrt(n)) below Z_CRIT (Bonferroni: 1% family-wise)."""
    spec, steps = case
    n = 6000
    labels = torch.arange(n) % 3
    model = _guided(MIXTURE, SDES[sde_name], 1.0)
    x = generate(model, n, (D,), spec, steps, seed=1, cond=_cond(labels)).double()
    assert torch.isfinite(x).all()
    means = [_component_stats(x[labels == k], k).mean(0) for k in range(3)] + [EQUAL.responsibilities(x).mean(0)]
    sizes = torch.tensor([n // 3] * (3 * len(STAT_NAMES[:9])) + [n] * 3, dtype=torch.float64)
    z = (torch.cat(means) - EXACT) / (STD / sizes.sqrt())
    bad = {name: round(float(v), 2) for name, v in zip(STAT_NAMES, z) if abs(v) >= Z_CRIT}
    assert not bad, f"{spec} on {sde_name} at {steps} steps: |z| >= {Z_CRIT:.2f} for {bad}; all z: {z.numpy().round(2)}"


# ----------------------------------------------------- 4. scale s != 1: what sampling does give
GRID = torch.linspace(-10.0, 10.0, 20001, dtype=torch.float64)  # 1-D quadrature nodes, h = 1e-3
H = float(GRID[1] - GRID[0])


def _tilted_on_grid(alpha: float, sigma: float, k: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(q, log q) on GRID: q = p_t(x) p_t(k | x)^s of LINE normalized numerically (trapezoid)."""
    log_q = _log_tilted(LINE, GRID[:, None], alpha, sigma, k, s).numpy()
    log_q = log_q - log_q.max()
    log_q = log_q - math.log(np.trapezoid(np.exp(log_q), dx=H))
    return np.exp(log_q), log_q


def _moment_z(x: np.ndarray, q: np.ndarray, f: np.ndarray) -> np.ndarray:
    """z of the first three sample moments of x against E_q[f^j], sized by the sample."""
    exact = np.array([np.trapezoid(q * f**j, dx=H) for j in (1, 2, 3)])
    std = np.sqrt(np.array([np.trapezoid(q * f ** (2 * j), dx=H) for j in (1, 2, 3)]) - exact**2)
    return (np.array([np.mean(x**j) for j in (1, 2, 3)]) - exact) / (std / math.sqrt(len(x)))


# The last level of the Langevin test: VE at sigma = 0.5, where 600 ald steps of 2 (0.16 sigma)^2 =
# 0.0128 (7.7 time units of Langevin, ~12 relaxation times of the widest component) mix; the chain
# starts from the level-T draws at +-200. Measured z (n = 2000) at 600 steps: s = 3: 1.65, 1.66, 1.66;
# s = 0.5: 0.74, 1.5, 1.06. With s = 3 at 500 steps 0.9-1.1, but 8.7-10.4 at 250 (not yet relaxed).
# Smaller levels need ~1/sigma^2 more steps (the step size is ~sigma^2). VP is not tested this way:
# predictor=none keeps y = x / alpha across levels, so x grows by alpha ratios (x15 from T) between them.
LANGEVIN_SIGMA = 0.5


@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_corrector_heavy_pc_samples_the_tilted_density_at_its_level(scale):
    """pc (predictor=none, ald corrector, 600 steps per level) ending at sigma = 0.5 on VE: its chain
    at that level targets q = p_t p_t(k | .)^s, and it returns Tweedie's x0 of the guided model there,
    T(x) = (x + sigma^2 d/dx log q) / alpha; the first three moments of the output must be those of
    T under the numerically normalized q (finite-difference log-derivative), |z| < 3.14 (Bonferroni
    over both scales' moments, 1%)."""
    k, n = 1, 2000
    t_end = math.log(LANGEVIN_SIGMA / 0.01) / math.log(100.0 / 0.01)  # VESDE(0.01, 100) at sigma 0.5
    sde = VESDE(sigma_max=100.0, sample_eps=t_end)
    alpha, sigma = float(sde.alpha(_t(t_end))), float(sde.sigma(_t(t_end)))
    q, log_q = _tilted_on_grid(alpha, sigma, k, scale)
    tweedie = (GRID.numpy() + sigma**2 * np.gradient(log_q, H)) / alpha
    spec = {"name": "pc", "predictor": "none", "corrector": "ald", "snr": 0.16, "corrector_steps": 600}
    x = generate(_guided(LINE, sde, scale), n, (1,), spec, 2, seed=1, cond=_cond(torch.full((n,), k)))
    z = _moment_z(x.double().numpy().ravel(), q, tweedie)
    assert np.all(np.abs(z) < float(norm.isf(0.01 / 12))), f"s={scale}: z of the first three moments {z.round(2)}"


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_plain_passes_with_scale_three_do_not_sample_the_tilted_data_density(sde_name):
    """The measurement of the module docstring, kept so it cannot silently change: with s = 3, ddpm
    (200 steps) and the ODE (dpmpp_2m, 50) sample far from p(x) p(k | x)^3 (their means 1.30-1.33
    and 1.71 against 1.023; measured max |z| 34-37 and 117-118). Asserted: max |z| > 10 for both."""
    k, n, sde = 1, 4000, SDES[sde_name]
    q, _ = _tilted_on_grid(1.0, 0.0, k, 3.0)
    for spec, steps in (({"name": "ddpm"}, 200), ({"name": "ode"}, 50)):
        x = generate(_guided(LINE, sde, 3.0), n, (1,), spec, steps, seed=1, cond=_cond(torch.full((n,), k)))
        z = _moment_z(x.double().numpy().ravel(), q, GRID.numpy())
        assert np.abs(z).max() > 10, f"{spec} on {sde_name}: z {z.round(2)}"


# --------------------------------------------------- 5. with classifier-free guidance, and the wrapper
def _eps(model, x, t, labels) -> torch.Tensor:
    with torch.inference_mode():
        return model(x.clone(), t.clone(), _cond(labels)).eps


@pytest.mark.parametrize("sde_name", list(SDES))
def test_combined_with_classifier_free_guidance(sde_name):
    """With the exact classifier g = grad log p(k | x_t) = score(x | k) - score(x), so CFG with weight w
    is score + w g, and (s = classifier scale):
    - ClassifierGuided(GuidedModel(conditional, w), s) = score + (w + s) g;
    - GuidedModel(ClassifierGuided(conditional, s), w) = score + w (1 + s) g (the null half unguided);
    - GuidedModel(ClassifierGuided(unconditional, s), w) = score + w s g;
    each compared with the unconditional model guided at that one scale."""
    sde, w, s, g = SDES[sde_name], 2.0, 1.5, torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(64, D, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64).clamp_min(sde.eps)
    labels = torch.randint(0, 3, (64,), generator=g)
    clf = ExactMixtureClassifier(MIXTURE, sde)
    cond_model, plain = MixtureModel(MIXTURE, sde, conditional=True), MixtureModel(MIXTURE, sde)
    cases = {
        "around CFG": (ClassifierGuided(GuidedModel(cond_model, w), clf, s), w + s),
        "inside CFG": (GuidedModel(ClassifierGuided(cond_model, clf, s), w), w * (1 + s)),
        "unconditional inside CFG": (GuidedModel(ClassifierGuided(plain, clf, s), w), w * s),
    }
    for name, (model, scale) in cases.items():
        expected = _eps(ClassifierGuided(plain, clf, scale), x, t, labels)
        torch.testing.assert_close(_eps(model, x, t, labels), expected, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


class _Spy(MixtureModel):
    """The unconditional mixture, recording each cond it is called with."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def forward(self, x, t, cond=None):
        self.seen.append(cond)
        return super().forward(x, t, cond)


def test_wrapper_keeps_the_model_protocol_and_counts_classifier_calls():
    sde = SDES["vp"]
    inner = _Spy(MIXTURE, sde)
    network_calls = []
    inner.register_forward_hook(lambda *_: network_calls.append(1))
    model = ClassifierGuided(inner, ExactMixtureClassifier(MIXTURE, sde), 2.0)
    assert model.sde is sde and model.backbone is None and model.capabilities.analytic
    assert model.capabilities.num_classes == 3 and "class_label" in model.capabilities.conditions
    assert model.conditioner.for_samples(0, 4, "cpu", class_label=2)["class_label"].tolist() == [2, 2, 2, 2]
    generate(model, 8, (D,), {"name": "pc"}, 10, cond=_cond(torch.arange(8) % 3))
    assert len(network_calls) == model.classifier_calls == 20  # pc: corrector + predictor per level
    assert all(not c for c in inner.seen), "an unconditional model must not be handed the class label"
    zero = ClassifierGuided(MixtureModel(MIXTURE, sde), ExactMixtureClassifier(MIXTURE, sde), 0.0)
    x, t, labels = torch.randn(8, D, dtype=torch.float64), torch.full((8,), 0.3, dtype=torch.float64), torch.arange(8) % 3
    torch.testing.assert_close(_eps(zero, x, t, labels), _eps(MixtureModel(MIXTURE, sde), x, t, labels), rtol=0, atol=0)
    assert zero.classifier_calls == 0


class _LinearClassifier(torch.nn.Module):
    """A trained classifier's shape: log_softmax(W x + b t) with gradient W_y - sum_j p_j W_j."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, 3, dtype=torch.float64)
        self.time = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))

    def log_probs(self, x, t):
        return torch.log_softmax(self.lin(x.double()) + t.double()[:, None] * self.time, dim=1)


def test_a_network_classifier_fits_the_protocol():
    clf = _LinearClassifier()
    x, t, labels = torch.randn(16, D, dtype=torch.float64), torch.rand(16, dtype=torch.float64), torch.arange(16) % 3
    with torch.no_grad():
        p = clf.log_probs(x, t).exp()
        expected = clf.lin.weight[labels] - p @ clf.lin.weight
    with torch.inference_mode():
        torch.testing.assert_close(classifier_grad(clf, x, t, labels), expected, rtol=1e-12, atol=1e-12)
    model = ClassifierGuided(MixtureModel(MIXTURE, SDES["vp"]), clf, 1.0)
    assert any(m is clf for m in model.modules()), "a network classifier moves with the model (.to, .eval)"


# ------------------------------------------------------------------------------ 6. bad input
def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 200, message
    return message


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), True, "2"])
def test_bad_scale_is_a_one_line_error(scale):
    sde = SDES["vp"]
    with pytest.raises(ConfigError) as err:
        ClassifierGuided(MixtureModel(MIXTURE, sde), ExactMixtureClassifier(MIXTURE, sde), scale)
    assert "classifier_scale" in _one_line(err)


def test_bad_classifiers_are_one_line_errors():
    vp, other = SDES["vp"], GaussianMixture(means=[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    cases = {
        "classes": (MixtureModel(MIXTURE, vp, conditional=True), ExactMixtureClassifier(other, vp)),
        "made for": (MixtureModel(MIXTURE, vp), ExactMixtureClassifier(MIXTURE, SDES["ve"])),
        "log_probs": (MixtureModel(MIXTURE, vp), object()),
    }
    for needle, (model, clf) in cases.items():
        with pytest.raises(ConfigError) as err:
            ClassifierGuided(model, clf, 1.0)
        assert needle in _one_line(err)

    class OneStep(MixtureModel):
        @property
        def capabilities(self):
            from dataclasses import replace

            return replace(super().capabilities, one_step=True)

    with pytest.raises(ConfigError) as err:
        ClassifierGuided(OneStep(MIXTURE, vp), ExactMixtureClassifier(MIXTURE, vp), 1.0)
    assert "consistency" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        ExactMixtureClassifier(MIXTURE, vp).log_probs(torch.zeros(2, 2), torch.zeros(2))
    assert "shape" in _one_line(err)


def test_bad_labels_are_one_line_errors():
    sde = SDES["vp"]
    model = ClassifierGuided(MixtureModel(MIXTURE, sde), ExactMixtureClassifier(MIXTURE, sde), 1.0)
    x, t = torch.zeros(2, D), torch.full((2,), 0.5)
    for labels in (torch.tensor([0, 4]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0])):
        with pytest.raises(ConfigError) as err:
            model(x, t, _cond(labels))
        assert "class_label" in _one_line(err)
    for cond in (None, {}):
        with pytest.raises(ConfigError) as err:
            model(x, t, cond)
        assert "class label" in _one_line(err)
    with pytest.raises(ConfigError) as err:  # the user's class_label=K: the null label is not a class
        check_labels(torch.tensor([3]), 3)
    assert "0..2" in _one_line(err)
