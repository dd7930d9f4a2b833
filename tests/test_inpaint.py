"""Inpainting without retraining (issue 16, section 3): RePaint and plain replacement
(diffctl/inpaint.py), the exact conditional of a Gaussian mixture (diffctl/mixture_conditional.py),
masks (diffctl/masks.py) and image sets (diffctl/image_sources.py).

Ground truth shares nothing with the code under test:
- the mixture conditional is checked pointwise against joint density / numerically integrated marginal
  (scipy quad over the mixture's own log_prob);
- RePaint's schedule against diffusers' RePaintScheduler (a peer implementation of the paper's);
- RePaint's whole chain, for a single Gaussian, against its output distribution propagated in closed
  form in x and t with DDPM's formulas (the chain is linear-Gaussian there);
- RePaint on a 2-component mixture against the exact conditional (z-tests sized by the sample, as
  tests/test_ground_truth.py), and plain replacement shown to miss it by a wide margin.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.integrate import quad
from scipy.stats import norm

from diffctl.errors import ConfigError
from diffctl.image_sources import read_images
from diffctl.images import to_uint8
from diffctl.inpaint import inpaint, jump_schedule, repaint, schedule_nfe
from diffctl.inpaint_report import inpaint_grid, masked_psnr, masked_ssim, region_metrics, ssim_map
from diffctl.masks import parse_flat_mask, parse_masks, random_mask
from diffctl.mixture_conditional import conditional
from diffctl.networks.gmm import GaussianMixture, MixtureModel
from diffctl.noise import SampleNoise
from diffctl.samplers.common import noise_levels
from diffctl.sde import SubVPSDE, VESDE, VPSDE

SDES = {"vp": VPSDE(), "vpsub": SubVPSDE(), "ve": VESDE(sigma_max=100.0)}
COV_A = [[0.5, 0.3, 0.1], [0.3, 0.6, 0.2], [0.1, 0.2, 0.5]]
COV_B = [[0.4, -0.1, 0.15], [-0.1, 0.5, 0.0], [0.15, 0.0, 0.45]]
# Two components that overlap in the unknown coordinates given x_0 = 0.6 (conditional weights 0.11 / 0.89
# against the prior's 0.6 / 0.4): RePaint's resampling can move between them (see test below).
MIXTURE = GaussianMixture(means=[[-1.0, -0.5, 0.3], [1.0, 0.8, -0.4]], covariances=[COV_A, COV_B], weights=[0.6, 0.4])
KNOWN = torch.tensor([True, False, False])
X_KNOWN = torch.tensor([0.6, 0.0, 0.0], dtype=torch.float64)


# ------------------------------------------------------------------ 1. the exact conditional
def _quad_check(mixture: GaussianMixture, x_known: float, points) -> None:
    """2-D mixture, x_0 known: p(x_1 | x_0) = p(x_0, x_1) / integral of p(x_0, u) du (scipy quad)."""
    joint = lambda u: math.exp(float(mixture.log_prob(torch.tensor([[x_known, u]], dtype=torch.float64))))
    marginal = quad(joint, -np.inf, np.inf, epsabs=0, epsrel=1e-12, limit=200)[0]
    cond = conditional(mixture, torch.tensor([True, False]), torch.tensor([x_known, 0.0], dtype=torch.float64))
    for u in points:
        got = math.exp(float(cond.log_prob(torch.tensor([[u]], dtype=torch.float64))))
        assert got == pytest.approx(joint(u) / marginal, rel=1e-9), u


@pytest.mark.parametrize("x_known", [-1.3, 0.2, 2.5])
def test_conditional_is_the_joint_over_the_integrated_marginal(x_known):
    full = GaussianMixture(means=[[-1.0, 0.5], [1.5, -1.0], [0.0, 2.0]],
                           covariances=[[[0.5, 0.35], [0.35, 0.6]], [[0.3, -0.2], [-0.2, 0.4]], [[0.2, 0.0], [0.0, 0.7]]],
                           weights=[0.5, 0.3, 0.2])  # fmt: skip
    diagonal = GaussianMixture(means=[[-1.0, 0.5], [1.5, -1.0]], scales=[[0.6, 0.9], [0.4, 0.5]], weights=[0.7, 0.3])
    points = np.linspace(-4.0, 4.0, 17)
    _quad_check(full, x_known, points)
    _quad_check(diagonal, x_known, points)


def test_conditional_in_higher_dimension_matches_the_joint_up_to_a_constant():
    """3-D, one known coordinate: log p(x_u | x_k) - log p(x_k, x_u) is the same (-log p(x_k)) at
    every x_u, for the full-covariance mixture (eigenbasis route of log_prob against Cholesky here)."""
    cond = conditional(MIXTURE, KNOWN, X_KNOWN)
    u = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    joint = MIXTURE.log_prob(torch.cat([X_KNOWN[:1].expand(50, 1), u], 1))
    diff = cond.log_prob(u) - joint
    torch.testing.assert_close(diff, diff[:1].expand(50), rtol=0, atol=1e-10)
    assert cond.weights.tolist() == pytest.approx([0.1124, 0.8876], abs=1e-4)


def test_conditional_far_from_a_component_keeps_a_finite_weight():
    """At x_0 = 600 component 1's weight is exp(-6e4) (0.0 as a float): it stays a finite log weight;
    component 0, the wider in x_0, takes all the weight."""
    cond = conditional(MIXTURE, KNOWN, torch.tensor([600.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.isfinite(cond.log_weights).all() and float(cond.weights[1]) == 0.0 and float(cond.weights[0]) == 1.0


def test_conditional_refuses_all_known():
    with pytest.raises(ConfigError, match="every coordinate is known"):
        conditional(MIXTURE, torch.ones(3, dtype=torch.bool), X_KNOWN)


# ------------------------------------------------------------------ 2. the schedule and NFE
@pytest.mark.parametrize("steps,jump,resample", [(25, 3, 4), (50, 10, 10), (20, 1, 5), (30, 5, 1), (7, 6, 3)])
def test_jump_schedule_is_diffusers_repaint_schedule(steps, jump, resample):
    pytest.importorskip("diffusers")
    from diffusers import RePaintScheduler

    sched = RePaintScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps, jump_length=jump, jump_n_sample=resample)
    path = jump_schedule(steps, jump, resample)
    assert [(steps - 1 - i) * (1000 // steps) for i in path] == sched.timesteps.tolist()
    jump_points = len(range(0, steps - jump, jump))
    assert schedule_nfe(path) == steps + (resample - 1) * jump * jump_points  # the paper's cost


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.sde, self.calls = inner, inner.sde, 0

    def forward(self, x, t, cond=None):
        self.calls += 1
        return self.inner(x, t, cond)


def test_nfe_is_counted_and_known_pixels_equal_the_input_exactly():
    """Digits images with the center mask and an 8x8 analytic mixture as the model: the known pixels
    of the result are the input's bit for bit, the unknown ones are filled; NFE = model calls."""
    images = read_images("digits:test", limit=4).images
    masks = parse_masks("center", 8, 8, 4).get(range(4))
    mixture = GaussianMixture(means=images[:3].reshape(3, -1).double(), scales=0.3, shape=(1, 8, 8))
    model = Counting(MixtureModel(mixture, SDES["vp"]))
    res = inpaint(model, images, masks, steps=12, jump_length=3, resample=3, seed=5)
    keep = masks.expand_as(images) == 1
    assert torch.equal(res.images[keep], images[keep])
    assert not torch.equal(res.images[~keep], images[~keep])
    assert res.nfe == model.calls == schedule_nfe(jump_schedule(12, 3, 3)) == 12 + 2 * 3 * 3


def test_a_sample_does_not_depend_on_its_batch():
    model = MixtureModel(MIXTURE, SDES["ve"])
    known = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    masks = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]).repeat(2, 1)
    run = lambda a, b: inpaint(model, known[a:b], masks[a:b], 15, jump_length=2, resample=3, seed=7, first_index=a).images
    whole = run(0, 6)
    torch.testing.assert_close(whole, torch.cat([run(0, 1), run(1, 4), run(4, 6)]), rtol=0, atol=0)
    other = inpaint(model, known, masks, 15, jump_length=2, resample=3, seed=8).images
    assert not torch.allclose(whole, other)


def _repaint_in_x(model, sde, known, keep, steps, jump, resample, spacing, seed, cond=None):
    """RePaint (Lugmayr et al. 2022, Alg. 1) written in x and t: before each model call the known part
    is alpha_t x_known + sigma_t z; a step down draws DDPM's posterior q(x_s | x_t, x0) (mean
    (a sigma_s^2 x_t + alpha_s v x0) / sigma_t^2, variance v sigma_s^2 / sigma_t^2, a = alpha_t/alpha_s,
    v = sigma_t^2 - a^2 sigma_s^2); a jump up draws q(x_t | x_s) = N(a x_s, v). Noise in the order
    inpaint draws it: the start, then per visited level the known part's draw and the step's."""
    gens = SampleNoise(seed, range(known.shape[0]))
    times = noise_levels(sde, steps, spacing)
    al = lambda i: float(sde.alpha(times[i]))
    sg = lambda i: float(sde.sigma(times[i]))
    x = sde.prior_std() * gens.randn(known.shape[1:], torch.float64)
    path = jump_schedule(steps, jump, resample)
    for a, b in zip(path, path[1:] + [None]):
        if b is not None and b < a:
            r = al(b) / al(a)
            x = r * x + math.sqrt(sg(b) ** 2 - r * r * sg(a) ** 2) * gens.randn(known.shape[1:], torch.float64)
            continue
        x = torch.where(keep, al(a) * known + sg(a) * gens.randn(known.shape[1:], torch.float64), x)
        x0 = model(x, times[a].expand(x.shape[0]), cond).x0
        if b is None:
            return torch.where(keep, known, x0)
        r = al(a) / al(b)
        v = sg(a) ** 2 - r * r * sg(b) ** 2
        mean = (r * sg(b) ** 2 * x + al(b) * v * x0) / sg(a) ** 2
        x = mean + math.sqrt(v) * sg(b) / sg(a) * gens.randn(known.shape[1:], torch.float64)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("resample,spacing", [(3, "trailing"), (1, "uniform"), (4, "logsnr")])
def test_repaint_is_the_x_space_chain_given_the_same_noise(sde_name, resample, spacing):
    """Path by path: inpaint (in y = x/alpha, s = sigma/alpha) equals RePaint written in x and t."""
    sde = SDES[sde_name]
    model = MixtureModel(MIXTURE, sde)
    known = torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    masks = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64).repeat(4, 1)
    got = inpaint(model, known, masks, 12, jump_length=3, resample=resample, spacing=spacing, seed=4).images
    expected = _repaint_in_x(model, sde, known, masks == 1, 12, 3, resample, spacing, seed=4)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_cond_reaches_the_model_untouched():
    """A class-conditional mixture (labels = components): inpaint with cond {"class_label": ...} is the
    x-space chain with the same cond, and differs from the unconditional result."""
    sde = SDES["vp"]
    model = MixtureModel(MIXTURE, sde, conditional=True)
    known = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    masks = KNOWN.double().expand(4, 3)
    cond = {"class_label": torch.tensor([0, 1, 0, 1])}
    got = inpaint(model, known, masks, 12, jump_length=3, resample=2, seed=4, cond=cond).images
    torch.testing.assert_close(got, _repaint_in_x(model, sde, known, masks == 1, 12, 3, 2, "trailing", 4, cond), rtol=1e-9, atol=1e-9)
    unconditional = inpaint(MixtureModel(MIXTURE, sde), known, masks, 12, jump_length=3, resample=2, seed=4).images
    assert not torch.allclose(got, unconditional)


def test_a_consistency_model_is_refused():
    class OneStep(MixtureModel):
        @property
        def capabilities(self):
            return dataclasses.replace(super().capabilities, one_step=True)

    with pytest.raises(ConfigError, match="a consistency model .one step. cannot run RePaint"):
        inpaint(OneStep(MIXTURE, SDES["vp"]), X_KNOWN.expand(2, 3), KNOWN.double().expand(2, 3), 20)


# ------------------------------------------------------------------ 3. the chain in closed form
GAUSS_MU = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
GAUSS_COV = torch.tensor(COV_A, dtype=torch.float64)


def _chain_moments(sde, steps: int, jump: int, resample: int, spacing: str, x_k: float):
    """Mean and covariance of RePaint's output for data N(GAUSS_MU, GAUSS_COV), coordinate 0 known, with
    the exact denoiser E[x0 | x_t] = mu + B (x_t - alpha mu), B = alpha S (alpha^2 S + sigma^2 I)^-1,
    propagated through the chain in x and t: the known part alpha x_k + sigma z (fresh z), DDPM's
    posterior step x_s = c1 x_t + c2 x0 + sqrt(v sigma_s^2 / sigma_t^2) z (a = alpha_t / alpha_s,
    v = sigma_t^2 - a^2 sigma_s^2, c1 = a sigma_s^2 / sigma_t^2, c2 = alpha_s v / sigma_t^2), the jump
    x_t = a x_s + sqrt(v) z, and the final x0 prediction. Everything stays Gaussian."""
    times = noise_levels(sde, steps, spacing)
    ab = lambda i: (float(sde.alpha(times[i])), float(sde.sigma(times[i])))
    eye = torch.eye(2, dtype=torch.float64)
    mu_u, mu_k = GAUSS_MU[1:], GAUSS_MU[0]
    path = jump_schedule(steps, jump, resample)
    m, P = torch.zeros(2, dtype=torch.float64), sde.prior_std() ** 2 * eye
    for a, b in zip(path, path[1:] + [None]):
        al, sg = ab(a)
        if b is not None and b < a:  # forward jump from level a up to level b
            al2, sg2 = ab(b)
            r = al2 / al
            m, P = r * m, r * r * P + (sg2**2 - r * r * sg**2) * eye
            continue
        B = al * GAUSS_COV @ torch.linalg.inv(al * al * GAUSS_COV + sg * sg * torch.eye(3, dtype=torch.float64))
        Buu, Buk = B[1:, 1:], B[1:, :1]
        h0 = mu_u - al * Buu @ mu_u + al * Buk[:, 0] * (x_k - mu_k)  # x0_u = h0 + Buu x_u + sigma Buk z_k
        if b is None:
            return h0 + Buu @ m, Buu @ P @ Buu.T + sg * sg * Buk @ Buk.T
        al_s, sg_s = ab(b)
        r = al / al_s
        v = sg**2 - r * r * sg_s**2
        c1, c2 = r * sg_s**2 / sg**2, al_s * v / sg**2
        G = c1 * eye + c2 * Buu
        m = G @ m + c2 * h0
        P = G @ P @ G.T + (c2 * sg) ** 2 * Buk @ Buk.T + v * sg_s**2 / sg**2 * eye


CHAIN_CASES = [(20, 4, 4, "uniform"), (16, 3, 1, "trailing"), (30, 10, 3, "trailing")]
N_CHAIN = 4000
CHAIN_Z = float(norm.isf(0.01 / (2 * len(CHAIN_CASES) * len(SDES) * 5)))


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("case", CHAIN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_repaint_chain_matches_its_closed_form_for_a_gaussian(sde_name, case):
    """Sample mean and covariance of the unknown coordinates against the propagated moments; each z is
    standard normal under the closed form (the output is exactly Gaussian: the sample covariance
    entry (x_i - m_i)(x_j - m_j) has variance P_ii P_jj + P_ij^2)."""
    steps, jump, resample, spacing = case
    sde, x_k = SDES[sde_name], 1.2
    mean, cov = _chain_moments(sde, steps, jump, resample, spacing, x_k)
    model = MixtureModel(GaussianMixture(GAUSS_MU[None], covariances=GAUSS_COV[None]), sde)
    known = torch.tensor([x_k, 0.0, 0.0], dtype=torch.float64).expand(N_CHAIN, 3)
    mask = KNOWN.double().expand(N_CHAIN, 3)
    out = inpaint(model, known, mask, steps, jump_length=jump, resample=resample, spacing=spacing, seed=2).images[:, 1:]
    n, d = N_CHAIN, out - mean
    z = [float(d[:, i].mean() / math.sqrt(cov[i, i] / n)) for i in range(2)]
    for i, j in ((0, 0), (0, 1), (1, 1)):
        se = math.sqrt((cov[i, i] * cov[j, j] + cov[i, j] ** 2) / n)
        z.append(float(((d[:, i] * d[:, j]).mean() - cov[i, j]) / se))
    assert max(abs(v) for v in z) < CHAIN_Z, f"{sde_name} {case}: z = {np.round(z, 2)} (mean, var0, cov01, var1), limit {CHAIN_Z:.2f}"


# ------------------------------------------------------------------ 4. against the exact conditional
_IU = torch.triu_indices(2, 2)
STAT_NAMES = ["mean[1]", "mean[2]", "cov[1,1]", "cov[1,2]", "cov[2,2]", "weight[0]", "weight[1]"]


@functools.lru_cache(maxsize=None)
def _target():
    cond = conditional(MIXTURE, KNOWN, X_KNOWN)
    exact = torch.cat([cond.mean(), cond.covariance()[_IU[0], _IU[1]], cond.weights])
    x, _ = cond.sample(400_000, torch.Generator().manual_seed(12345))
    return cond, exact, _stats(cond, x).std(0)


def _stats(cond: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Per-sample statistics whose means under the conditional are its mean, covariance entries and
    component weights (E[p(k | x)] = w_k for x from the mixture)."""
    xc = x - cond.mean()
    return torch.cat([x, xc[:, _IU[0]] * xc[:, _IU[1]], cond.responsibilities(x)], 1)


# RePaint at 200 logsnr levels, jump 2, 20 resamplings (3962 NFE). Measured (n = 4000, seed 1) its worst
# |z| is 2.3 on vp and ve: a residual bias (RePaint is not an exact sampler; the resampling only lets
# the unknown part re-adjust to a noisy known part) below this sample's resolution. Fewer levels leave
# the variance short (100 levels: |z| 3.8), fewer resamplings the mean. Plain replacement at the same 200
# levels misses by |z| 11-41 on every statistic, the weights included (0.15 / 0.85 against 0.11 / 0.89).
# Not claimed: conditionals whose components are far apart compared with their widths. Measured on the
# 2-D mixture means (-1.5, -1), (1.5, 1), (0.5, -2), covariances [[.3, .2], [.2, .4]], [[.25, -.1], [-.1, .3]],
# .2 I, weights .5 / .3 / .2, x_0 = 0.3 known (exact conditional weights 0.009 / 0.076 / 0.915), vp, n = 4000:
# replacement 0.126 / 0.304 / 0.570, RePaint as above 0.026 / 0.238 / 0.735, (250 levels, j = 10, r = 10)
# 0.041 / 0.272 / 0.687: resampling helps but cannot move samples between modes once the noise is below
# their separation, and above it the known part is too noisy to pick the mode.
REPAINT = dict(steps=200, jump_length=2, resample=20, spacing="logsnr")
N_COND = 4000
GT_SDES = ("vp", "ve")
COND_Z = float(norm.isf(0.01 / (2 * len(GT_SDES) * len(STAT_NAMES))))


def _z_against_the_conditional(sde_name: str, method: str) -> torch.Tensor:
    cond, exact, std = _target()
    model = MixtureModel(MIXTURE, SDES[sde_name])
    known = X_KNOWN.expand(N_COND, 3)
    out = inpaint(model, known, KNOWN.double().expand(N_COND, 3), method=method, seed=1, **REPAINT)
    assert torch.equal(out.images[:, 0], known[:, 0])
    return (_stats(cond, out.images[:, 1:]).mean(0) - exact) / (std / math.sqrt(N_COND))


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", GT_SDES)
def test_repaint_matches_the_exact_conditional_of_a_mixture(sde_name):
    z = _z_against_the_conditional(sde_name, "repaint")
    bad = {name: round(float(v), 2) for name, v in zip(STAT_NAMES, z) if abs(v) >= COND_Z}
    assert not bad, f"repaint {REPAINT} on {sde_name}, n={N_COND}: |z| >= {COND_Z:.2f} for {bad}; all z: {z.numpy().round(2)}"


def test_plain_replacement_is_biased_where_repaint_is_not():
    """The motivation for RePaint: the replacement method (same levels, no resampling) conditions the
    unknown part on a noised known part only, and misses the conditional by many standard errors."""
    z = _z_against_the_conditional("vp", "replace")
    assert float(z.abs().max()) > 3 * COND_Z, f"replacement is not clearly biased: z = {z.numpy().round(2)}"
    assert float(z[:2].abs().min()) > COND_Z and float(z[5:].abs().max()) > COND_Z  # both means and the weights


# ------------------------------------------------------------------ 5. bad inputs to the algorithm
def test_inpaint_refuses_bad_options():
    model = MixtureModel(MIXTURE, SDES["vp"])
    known, mask = X_KNOWN.expand(2, 3), KNOWN.double().expand(2, 3)
    with pytest.raises(ConfigError, match="unknown inpainting method 'paint'"):
        inpaint(model, known, mask, 10, method="paint")
    with pytest.raises(ConfigError, match="jump_length=10 must be below steps=10"):
        inpaint(model, known, mask, 10, jump_length=10, resample=2)
    with pytest.raises(ConfigError, match="resample must be a positive integer"):
        inpaint(model, known, mask, 10, resample=0)
    with pytest.raises(ConfigError, match="only 0 .* and 1"):
        inpaint(model, known, mask * 0.5, 20)
    with pytest.raises(ConfigError, match="does not broadcast"):
        repaint(model, torch.zeros(2, 3), 20, known, torch.ones(2, 4), noise=SampleNoise(0, range(2)))
    assert inpaint(model, known, mask, 10, jump_length=10, method="replace").nfe == 10  # no jumps: any jump_length


# ------------------------------------------------------------------ 6. masks
def _png(path, array) -> str:
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return str(path)


def test_center_and_box_masks():
    center = parse_masks("center", 8, 8, 3).get([0, 2])
    assert center.shape == (2, 1, 8, 8) and center.dtype == torch.float32
    expected = torch.ones(8, 8)
    expected[2:6, 2:6] = 0  # the middle half box
    assert torch.equal(center[0, 0], expected) and torch.equal(center[1, 0], expected)
    box = parse_masks("box:1,2,4,7", 8, 6, 1).get([0])[0, 0]  # height 8, width 6: columns 1..3, rows 2..6
    assert box.shape == (8, 6)
    hole = (box == 0).nonzero().tolist()
    assert {(r, c) for r, c in hole} == {(r, c) for r in range(2, 7) for c in range(1, 4)}


@pytest.mark.parametrize(
    "spec,message",
    [("box:0,0,9,4", "not a box inside the 8x8 images"), ("box:3,3,3,5", "not a box inside"), ("box:-1,0,2,2", "not a box inside"),
     ("box:1,2,3", "a box is box:x0,y0,x1,y1"), ("box:0,0,8,8", "keeps nothing known"), ("circle", "unknown mask='circle'"),
     ("nowhere/mask.png", "does not exist")],
)
def test_bad_mask_values_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_masks(spec, 8, 8, 2)
    assert "\n" not in str(err.value)


def test_mask_files_and_folders(tmp_path):
    good = np.full((8, 8), 255)
    good[3:5, 1:7] = 0
    path = _png(tmp_path / "m.png", good)
    assert torch.equal(parse_masks(path, 8, 8, 5).get([4])[0, 0], torch.from_numpy(good == 255).float())
    cases = {
        "wrong size": (np.full((8, 6), 255), "is 6x8 pixels, the images are 8x8"),
        "gray": (np.where(good == 0, 0, 128), "not binary: it has 2 gray levels"),
        "white": (np.full((8, 8), 255), "marks nothing to inpaint"),
        "black": (np.zeros((8, 8)), "keeps nothing known"),
    }
    for name, (array, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            parse_masks(_png(tmp_path / f"{name}.png", array), 8, 8, 1)
    Image.fromarray(good.astype(np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(ConfigError, match="is a JPEG image, not a PNG"):
        parse_masks(str(tmp_path / "m.jpg"), 8, 8, 1)
    folder = tmp_path / "masks"
    folder.mkdir()
    for i, name in enumerate(["b.png", "a.png", "c.png"]):  # sorted by name: a, b, c
        m = np.full((8, 8), 255)
        m[i, :] = 0
        _png(folder / name, m)
    got = parse_masks(str(folder), 8, 8, 3).get([0, 1, 2])
    assert [int((g[0] == 0).nonzero()[0, 0]) for g in got] == [1, 0, 2]  # a.png holds row 1, b.png row 0
    with pytest.raises(ConfigError, match="holds 3 masks for 4 images"):
        parse_masks(str(folder), 8, 8, 4)
    _png(folder / "d.png", np.full((8, 8), 7))
    with pytest.raises(ConfigError, match="d.png is not binary"):
        parse_masks(str(folder), 8, 8, 4)


def test_flat_masks_for_mixture_samples():
    assert parse_flat_mask("known:2, 0", 3).tolist() == [[1.0, 0.0, 1.0]]
    for spec, message in (("known:3", "coordinate 3 is outside the samples' 3 coordinates"), ("center", "known:i,j"),
                          ("known:0,1,2", "marks nothing to inpaint"), ("known:", "known:i,j")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            parse_flat_mask(spec, 3)


def test_random_masks_are_reproducible_per_seed_and_index():
    masks = parse_masks("random", 32, 32, 10)
    a = masks.get([0, 3, 7], seed=4)
    assert torch.equal(a[1], masks.get([3], seed=4)[0])  # index 3 alone: the same mask
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], masks.get([3], seed=5)[0])
    for size in (8, 32, 64):
        for i in range(20):
            known = random_mask(size, size, 0, i)
            assert 0 < known.sum() < known.size  # something to inpaint, something known
    holes = np.mean([1 - random_mask(64, 64, 0, i).mean() for i in range(50)])
    assert 0.1 < holes < 0.6, holes  # box of 1/16..1/4 of the area plus strokes


# ------------------------------------------------------------------ 7. image sets
def test_dataset_images_and_labels():
    s = read_images("digits:test", limit=5)
    assert s.images.shape == (5, 1, 8, 8) and s.images.dtype == torch.float32
    from diffctl.data import build_dataset

    ds = build_dataset("digits", split="test", limit=5)
    assert torch.equal(s.images, torch.stack([ds[i]["image"] for i in range(5)]))
    assert s.labels.tolist() == [ds[i]["class_label"] for i in range(5)]
    assert float(s.images.min()) >= -1 and float(s.images.max()) <= 1


def test_image_folders(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    s = read_images(str(tmp_path))
    assert s.images.shape == (3, 3, 6, 5) and s.labels is None and s.names == ["img0.png", "img1.png", "img2.png"]
    assert torch.equal(to_uint8(s.images), torch.from_numpy(np.stack(arrays)))  # exact round trip
    gray = read_images(str(tmp_path), channels=1)
    assert gray.images.shape == (3, 1, 6, 5)
    jpeg_dir = tmp_path / "jpeg"
    jpeg_dir.mkdir()
    Image.fromarray(arrays[0][..., 0]).save(jpeg_dir / "a.jpg", quality=100)  # grayscale JPEG
    Image.fromarray(arrays[1]).save(jpeg_dir / "b.jpeg", quality=100)
    jpegs = read_images(str(jpeg_dir))
    assert jpegs.images.shape == (2, 1, 6, 5)  # channels from the first file; the RGB one converted
    assert float((to_uint8(jpegs.images)[0, ..., 0].int() - torch.from_numpy(arrays[0][..., 0]).int()).abs().max()) <= 3
    with pytest.raises(ConfigError, match="has 5x6 images, 8x8 are needed"):
        read_images(str(tmp_path), resolution=8)
    Image.fromarray(arrays[0][:4]).save(tmp_path / "img3.png")
    with pytest.raises(ConfigError, match=r"img3.png is 5x4, the first image .* is 5x6"):
        read_images(str(tmp_path))
    (tmp_path / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ConfigError, match="cannot read image .*img3.png") as err:
        read_images(str(tmp_path))
    assert "\n" not in str(err.value)


def test_npz_images(tmp_path):
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", samples=samples, labels=np.arange(4))
    s = read_images(str(tmp_path / "samples.npz"))
    assert s.images.shape == (4, 1, 8, 8) and s.labels.tolist() == [0, 1, 2, 3]
    assert torch.equal(to_uint8(s.images), torch.from_numpy(samples))
    np.savez(tmp_path / "float.npz", samples=np.full((2, 8, 8, 1), 1.5, dtype=np.float32))
    with pytest.raises(ConfigError, match=r"values in \[1.5, 1.5\]; float images must lie in \[-1, 1\]"):
        read_images(str(tmp_path / "float.npz"))
    raw = read_images(str(tmp_path / "float.npz"), raw=True)  # model=gmm samples: any values
    assert raw.images.dtype == torch.float64 and float(raw.images.max()) == 1.5
    np.savez(tmp_path / "other.npz", images=samples)
    with pytest.raises(ConfigError, match="has no `samples` array .found: images"):
        read_images(str(tmp_path / "other.npz"))
    with pytest.raises(ConfigError, match="has 1-channel images, 3 are needed"):
        read_images(str(tmp_path / "samples.npz"), channels=3)


@pytest.mark.parametrize(
    "spec,message",
    [("digits:valid", "split must be one of train, test"), ("faces:test", "is neither <dataset>:<split>"),
     ("missing.npz", "does not exist"), ("nowhere/", "is neither")],
)
def test_bad_image_sources_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        read_images(spec)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ 8. what the command reports
def _pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    return a, (a + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-1, 1)


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 3, 16, 12)])
def test_masked_psnr_and_ssim_against_torchmetrics(shape):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    result, original = _pair(shape, 0)
    mask = parse_masks("random", shape[2], shape[3], shape[0]).get(range(shape[0]), seed=1).double()
    psnr = masked_psnr(result, original, mask)
    for i in range(shape[0]):
        hole = (mask[i].expand(shape[1:]) == 0)
        expected = peak_signal_noise_ratio(result[i][hole], original[i][hole], data_range=2.0)
        assert float(psnr[i]) == pytest.approx(float(expected), rel=1e-6)  # torchmetrics rounds through float32
    _, full = structural_similarity_index_measure(result, original, data_range=2.0, return_full_image=True, reduction="none")
    torch.testing.assert_close(ssim_map(result, original), full, rtol=1e-9, atol=1e-12)
    hole = (mask == 0).expand(shape).double()
    torch.testing.assert_close(masked_ssim(result, original, mask), (full * hole).flatten(1).sum(1) / hole.flatten(1).sum(1))
    same = region_metrics(original, original, mask)
    assert same == {"psnr_masked": math.inf, "ssim_masked": pytest.approx(1.0)}


def test_the_grid_shows_input_mask_and_result_per_row():
    inputs, result = _pair((2, 3, 8, 8), 2)
    mask = parse_masks("center", 8, 8, 2).get([0, 1])
    grid = inpaint_grid(inputs, mask, result)
    tile = 32 + 2  # 8 px tiles upscaled 4x to 32 (images.make_grid's min_tile), 2 px padding
    assert grid.shape == (2 + 2 * tile, 2 + 3 * tile, 3) and grid.dtype == torch.uint8
    cell = lambda r, c: grid[2 + r * tile : r * tile + tile, 2 + c * tile : c * tile + tile][::4, ::4]
    assert torch.equal(cell(1, 0), to_uint8(inputs)[1]) and torch.equal(cell(1, 2), to_uint8(result)[1])
    assert torch.equal(cell(0, 1)[..., 0], (mask[0, 0] * 255).to(torch.uint8))


def test_inpaint_runs_a_trained_network_on_dataset_images_with_every_mask_kind(trained, tmp_path):
    """The pieces `diffctl inpaint` will call, on the tiny U-Net trained on digits: images from
    digits:test, masks of each kind, RePaint with cond {}; known pixels exact, the rest finite."""
    from diffctl.build import load_denoiser

    _, run_dir = trained
    model, _ = load_denoiser(run_dir)
    images = read_images("digits:test", limit=3, resolution=8, channels=1)
    mask_file = np.full((8, 8), 255)
    mask_file[4:, :] = 0
    path = _png(tmp_path / "m.png", mask_file)
    for spec in ("center", "box:0,0,4,4", "random", path):
        masks = parse_masks(spec, 8, 8, len(images)).get(range(len(images)), seed=0)
        res = inpaint(model, images.images, masks, steps=6, jump_length=2, resample=2, cond={})
        keep = masks.expand_as(images.images) == 1
        assert torch.equal(res.images[keep], images.images[keep]) and torch.isfinite(res.images).all(), spec
        assert res.nfe == 6 + 1 * 2 * 2
    assert set(region_metrics(res.images, images.images, masks)) == {"psnr_masked", "ssim_masked"}
