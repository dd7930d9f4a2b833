"""objective=edm and the edm parameterization (Karras et al. 2022), and ddpm's min-SNR-gamma weighting
(Hang et al. 2023), each against the papers' formulas written out here independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import compose_train, load_ckpt, run_sample, run_train, tiny_overrides
from torch import nn

from diffctl.build import build_objective, build_sde, load_denoiser
from diffctl.denoiser import Prediction, compose
from diffctl.errors import ConfigError
from diffctl.networks import UNet
from diffctl.networks.gmm import GaussianMixture, MixtureModel
from diffctl.objectives import DDPMObjective, EDMObjective
from diffctl.rng import BatchRandom
from diffctl.schema import validate
from diffctl.sde import SubVPSDE, VESDE, VPSDE

SDES = {"vp": VPSDE(), "vpsub": SubVPSDE(), "ve": VESDE(0.02, 80.0)}


def _rng(n, seed=0, step=0, rank=0, world=1):
    return BatchRandom(seed, step, 0, rank, world, n, "cpu")


def _col(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def table1(s, sd):
    """Karras et al. 2022, Table 1, EDM column, in its own variables (sigma = s); s a numpy array or a tensor."""
    log = torch.log if isinstance(s, torch.Tensor) else np.log
    return {"c_skip": sd**2 / (s**2 + sd**2), "c_out": s * sd / (sd**2 + s**2) ** 0.5,
            "c_in": 1 / (s**2 + sd**2) ** 0.5, "c_noise": log(s) / 4, "lambda": (s**2 + sd**2) / (s * sd) ** 2}  # fmt: skip


class Recorder(nn.Module):
    """A backbone that records what it is given and returns a fixed output F."""

    def __init__(self, out):
        super().__init__()
        self.out, self.seen = out, {}

    def forward(self, x, noise_label, class_labels=None):
        self.seen = {"input": x, "c_noise": noise_label}
        return self.out


@pytest.mark.parametrize("sd", [0.5, 1.3])
@pytest.mark.parametrize("name", list(SDES))
def test_edm_scalings_are_table_1_and_predict_is_c_skip_x_plus_c_out_f(name, sd):
    """In x = alpha y: the network sees c_in(s) y and c_noise(s) = ln(s)/4, and x0 = c_skip(s) y + c_out(s) F."""
    sde = SDES[name]
    t = torch.tensor([sde.eps, 1e-3, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(6, 2, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    net = Recorder(out)
    model = compose(net, sde, "edm", sigma_data=sd)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    s = (sigma / alpha).numpy()
    ref = {k: torch.from_numpy(v) for k, v in table1(s, sd).items()}
    y = x / _col(alpha, x)
    pred = model(x, t)
    torch.testing.assert_close(net.seen["input"], _col(ref["c_in"], x) * y, rtol=1e-12, atol=0)
    torch.testing.assert_close(net.seen["c_noise"], ref["c_noise"], rtol=1e-12, atol=1e-15)
    expected_x0 = _col(ref["c_skip"], x) * y + _col(ref["c_out"], x) * out
    torch.testing.assert_close(pred.x0, expected_x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.eps, (x - _col(alpha, x) * expected_x0) / _col(sigma, x), rtol=1e-9, atol=1e-9)
    # The published scalings (in x: c_skip/alpha), and c_skip x + c_out F equals predict.
    p = model.parameterization
    c_skip, c_out = p.c_skip_out(t, _col(alpha, x), _col(sigma, x))
    torch.testing.assert_close(c_skip.reshape(-1) * alpha, ref["c_skip"], rtol=1e-12, atol=0)
    torch.testing.assert_close(c_out.reshape(-1), ref["c_out"], rtol=1e-12, atol=0)
    torch.testing.assert_close(c_skip * x + c_out * out, pred.x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.c_in(alpha, sigma) * alpha, ref["c_in"], rtol=1e-12, atol=0)  # c_in in x: c_in(s)/alpha


class MixtureAsEDMNetwork(nn.Module):
    """The exact mixture denoiser written as an edm network output: from (c_in y, ln(s)/4) it recovers s and y
    and returns F = (D(y; s) - c_skip y)/c_out, D = E[x0 | y] in the VE variables (alpha = 1, sigma = s)."""

    def __init__(self, mixture, sd):
        super().__init__()
        self.mixture, self.sd = mixture, sd

    def forward(self, x, noise_label, class_labels=None):
        s = torch.exp(4 * noise_label.double())
        k = {key: _col(v, x) for key, v in table1(s, self.sd).items()}
        y = x / k["c_in"]
        d, _ = self.mixture.denoise(y, torch.ones_like(s), s)
        return (d - k["c_skip"] * y) / k["c_out"]


def _mixture(dim=3, seed=0):
    means = 0.8 * torch.randn(3, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return GaussianMixture(means, scales=[0.2, 0.35, 0.5], weights=[0.5, 0.3, 0.2])


@pytest.mark.parametrize("name", list(SDES))
def test_the_exact_mixture_denoiser_round_trips_through_an_edm_network_output(name):
    sde, sd = SDES[name], 0.5
    mixture = _mixture()
    exact = MixtureModel(mixture, sde)
    model = compose(MixtureAsEDMNetwork(mixture, sd), sde, "edm", sigma_data=sd)
    t = torch.tensor([1e-3, 0.02, 0.1, 0.4, 0.8, 1.0], dtype=torch.float64)
    x0, _ = mixture.sample(6, torch.Generator().manual_seed(1))
    x = sde.marginal(x0, t, torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    got, want = model(x, t), exact(x, t)
    torch.testing.assert_close(got.x0, want.x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.eps, want.eps, rtol=1e-7, atol=1e-7)


def _expected(obj, f):
    """E_z f(s(z)) for s = clamp(exp(p_mean + p_std z), s(eps), s(T)), z ~ N(0, 1), by quadrature."""
    z = np.linspace(-9, 9, 200001)
    lo, hi = (float(obj.sde.noise_ratio(torch.tensor(t, dtype=torch.float64))) for t in (obj.sde.eps, obj.sde.T))
    s = np.clip(np.exp(obj.p_mean + obj.p_std * z), lo, hi)
    return np.trapezoid(f(s) * np.exp(-z * z / 2) / math.sqrt(2 * math.pi), z)


class Shifted(nn.Module):
    def __init__(self, inner, delta):
        super().__init__()
        self.inner, self.delta, self.sde = inner, delta, inner.sde

    def forward(self, x, t, cond=None):
        p = self.inner(x, t, cond)
        x0 = p.x0 + self.delta
        return Prediction(x0=x0, eps=(x - _col(self.sde.alpha(t), x) * x0) / p.sigma, sigma=p.sigma)


@pytest.mark.parametrize("name", list(SDES))
def test_edm_loss_of_the_exact_denoiser_is_the_irreducible_value(name):
    """Gaussian data N(0, diag(v)): E[x0 | y] is v/(v + s^2) y, its error has variance v s^2/(v + s^2) per
    dimension, so the irreducible loss is E_s[lambda(s) mean_d v_d s^2/(v_d + s^2)] (a 1-D integral over
    ln s, done by quadrature here). A shifted denoiser costs more on the same draws."""
    sde, sd, n = SDES[name], 0.5, 65536  # the per-sample loss is heavy-tailed: standard error 0.5% at this n
    v = torch.tensor([0.05, 0.25, 1.0, 4.0], dtype=torch.float64)
    gaussian = GaussianMixture(torch.zeros(1, 4, dtype=torch.float64), scales=v.sqrt()[None])
    obj = EDMObjective(sde, sigma_data=sd)
    lam = lambda s: table1(s, sd)["lambda"]  # noqa: E731
    want = _expected(obj, lambda s: lam(s) * np.mean([vd * s**2 / (vd + s**2) for vd in v.tolist()], axis=0))
    x0, _ = gaussian.sample(n, torch.Generator().manual_seed(3))
    exact = MixtureModel(gaussian, sde)
    got = float(obj.loss(exact, x0, None, _rng(n, seed=5)))
    assert got == pytest.approx(want, rel=0.025), (got, want)  # measured -0.20% (every SDE); lambda = 1/s^2: -52%
    shifted = float(obj.loss(Shifted(exact, 0.05), x0, None, _rng(n, seed=5)))
    assert shifted > got * 1.1, (shifted, got)
    # The mixture: the exact denoiser beats a shifted one on every seed, and its loss is near its own average.
    mixture, n = _mixture(dim=4), 8192
    x0, _ = mixture.sample(n, torch.Generator().manual_seed(4))
    exact = MixtureModel(mixture, sde)
    for seed in range(3):
        assert float(obj.loss(exact, x0, None, _rng(n, seed))) < float(obj.loss(Shifted(exact, 0.02), x0, None, _rng(n, seed)))


def test_the_noise_levels_are_log_normal_with_the_papers_mean_and_std():
    """ln s ~ N(-1.2, 1.2^2): Kolmogorov-Smirnov distance to that normal under its 1% critical value."""
    n = 20000
    obj = EDMObjective(VESDE(1e-4, 1e4))
    ln_s = obj.noise_ratios(_rng(n, seed=11), n).log()
    assert float(ln_s.mean()) == pytest.approx(-1.2, abs=3 * 1.2 / math.sqrt(n))
    assert float(ln_s.std()) == pytest.approx(1.2, rel=0.02)
    z = torch.sort((ln_s + 1.2) / 1.2).values
    cdf = torch.special.ndtr(z)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())
    assert ks < 1.63 / math.sqrt(n), ks
    # Clamped into the SDE's range, and mapped to the t whose noise ratio is s.
    sde = VESDE(0.02, 10.0)
    obj = EDMObjective(sde)
    s = obj.noise_ratios(_rng(n, seed=11), n)
    t = obj.times(s)
    assert float(t.min()) == pytest.approx(sde.eps) and float(t.max()) == pytest.approx(sde.T)
    torch.testing.assert_close(sde.noise_ratio(t), s.clamp(0.02 * 500**sde.eps, 10.0), rtol=1e-9, atol=0)


def _perturbed_unet(seed=0):
    torch.manual_seed(seed)
    net = UNet(in_channels=1, resolution=8, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    with torch.no_grad():  # zero-initialized output layers would hide the parameterization
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.double().requires_grad_(False)


@pytest.mark.parametrize("name", list(SDES))
def test_with_its_own_parameterization_the_loss_is_the_unit_weight_mse_of_f(name):
    """lambda(s) ||c_skip y + c_out F - y0||^2 = ||F - (y0 - c_skip y)/c_out||^2, since lambda c_out^2 = 1."""
    sde, sd, n = SDES[name], 0.5, 8
    model = compose(_perturbed_unet(), sde, "edm", sigma_data=sd)
    x0 = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    obj = EDMObjective(sde, sigma_data=sd)
    loss = obj.loss(model, x0, None, _rng(n, seed=2))
    rng = _rng(n, seed=2)  # the objective's draws, in its order: ln s, then the noise
    t = obj.times(obj.noise_ratios(rng, n))
    noise = rng.randn(x0.shape, torch.float64)
    s = sde.noise_ratio(t)
    k = {key: _col(v, x0) for key, v in table1(s, sd).items()}
    y = x0 + _col(s, x0) * noise
    f = model.raw(_col(sde.alpha(t), x0) * y, t)
    effective = (x0 - k["c_skip"] * y) / k["c_out"]
    torch.testing.assert_close(loss, (f - effective).pow(2).mean(), rtol=1e-9, atol=0)


def test_an_edm_network_computes_the_same_loss_under_every_sde():
    """In y = x/alpha every SDE is y = x0 + s eps, and the edm network sees only c_in(s) y and ln(s)/4: for
    draws that no SDE clamps (its range covers |z| <= 5.9, the keyed normals' bound) the loss is one number.
    A noise label in t (the other kinds' 1000 t) would tell the SDEs apart."""
    n = 8
    x0 = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    net = _perturbed_unet()
    sdes = (VPSDE(1e-3, 30.0), SubVPSDE(1e-3, 30.0), VESDE(1e-4, 1e3))  # each covers s in [1.1e-4, 1e3]
    losses = [float(EDMObjective(sde).loss(compose(net, sde, "edm"), x0, None, _rng(n, seed=8))) for sde in sdes]
    assert losses[1] == pytest.approx(losses[0], rel=1e-9) and losses[2] == pytest.approx(losses[0], rel=1e-9), losses


def test_the_draws_are_keyed_and_split_across_ranks_like_the_global_batch():
    sde, n, world = VPSDE(), 8, 2
    model = compose(_perturbed_unet(), sde, "edm")
    obj = EDMObjective(sde)
    x0 = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    loss = lambda rng, x=x0: float(obj.loss(model, x, None, rng).detach())  # noqa: E731
    assert loss(_rng(n, seed=4, step=9)) == loss(_rng(n, seed=4, step=9))
    assert loss(_rng(n, seed=4, step=9)) != loss(_rng(n, seed=4, step=10))
    single = obj.noise_ratios(_rng(n, seed=4, step=9), n)
    parts = [obj.noise_ratios(_rng(n // world, 4, 9, r, world), n // world) for r in range(world)]
    assert torch.equal(torch.cat(parts), single)
    ranks = [loss(_rng(n // world, 4, 9, r, world), x0[r * n // world : (r + 1) * n // world]) for r in range(world)]
    assert sum(ranks) / world == pytest.approx(loss(_rng(n, seed=4, step=9)), rel=1e-10)


# ----------------------------------------------------------------------------- min-SNR-gamma


def _outputs(kind, f, x, a, s):
    """(x0_hat, eps_hat, v_hat) of a network predicting `kind`, by hand from x = a x0 + s eps, v = a eps - s x0."""
    if kind == "x0":
        x0 = f
    elif kind == "eps":
        x0 = (x - s * f) / a
    else:  # v: a x - s v = (a^2 + s^2) x0
        x0 = (a * x - s * f) / (a * a + s * s)
    eps = (x - a * x0) / s
    return x0, eps, a * eps - s * x0


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_the_edm_loss_trains_other_parameterizations_through_their_x0(kind):
    """With an eps, x0 or v network the loss is lambda(s) ||x0_hat - x0||^2, x0_hat by hand from the raw output."""
    sde, sd, n = SDES["vp"], 0.5, 8
    model = compose(_perturbed_unet(), sde, kind, sigma_data=sd)
    x0 = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    obj = EDMObjective(sde, sigma_data=sd)
    loss = obj.loss(model, x0, None, _rng(n, seed=3))
    rng = _rng(n, seed=3)
    t = obj.times(obj.noise_ratios(rng, n))
    noise = rng.randn(x0.shape, torch.float64)
    a, s = _col(sde.alpha(t), x0), _col(sde.sigma(t), x0)
    x = a * x0 + s * noise
    x0_hat = _outputs(kind, model.raw(x, t), x, a, s)[0]
    lam = table1(sde.noise_ratio(t), sd)["lambda"]
    torch.testing.assert_close(loss, (lam * (x0_hat - x0).pow(2).flatten(1).mean(1)).mean(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("gamma", [5.0, 1.0])
@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("name", list(SDES))
def test_min_snr_loss_is_the_papers_in_x0_eps_and_v_space(name, kind, gamma):
    """Hang et al. 2023: min(SNR, gamma) on an x0 error, min(SNR, gamma)/SNR on an eps error,
    min(SNR, gamma)/(SNR + 1) on a v error (VP; min(SNR, gamma) s^2/(a^2 + s^2)^2 in general). The old
    diffusers weight min(SNR, gamma)/SNR on a v error is another number."""
    sde, n = SDES[name], 16
    model = compose(_perturbed_unet(), sde, kind)
    x0 = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    loss = float(DDPMObjective(sde, weighting="min_snr", snr_gamma=gamma).loss(model, x0, None, _rng(n, seed=6)))
    rng = _rng(n, seed=6)
    t = (sde.eps + (sde.T - sde.eps) * rng.stratified_uniform(n)).double()
    noise = rng.randn(x0.shape, torch.float64)
    a, s = _col(sde.alpha(t), x0), _col(sde.sigma(t), x0)
    x = a * x0 + s * noise
    x0_hat, eps_hat, v_hat = _outputs(kind, model.raw(x, t), x, a, s)
    mse = lambda u, w: (u - w).pow(2).flatten(1).mean(1)  # noqa: E731
    snr = (sde.alpha(t) / sde.sigma(t)) ** 2
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    norm = (sde.alpha(t) ** 2 + sde.sigma(t) ** 2).reshape(-1)
    by_space = {
        "x0": (clipped * mse(x0_hat, x0)).mean(),
        "eps": (clipped / snr * mse(eps_hat, noise)).mean(),
        "v": (clipped * sde.sigma(t) ** 2 / norm**2 * mse(v_hat, a * noise - s * x0)).mean(),
    }
    if name == "vp":
        by_space["v (vp)"] = (clipped / (snr + 1) * mse(v_hat, a * noise - s * x0)).mean()
    for space, value in by_space.items():
        assert loss == pytest.approx(float(value), rel=1e-9), space
    diffusers_bug = float((clipped / snr * mse(v_hat, a * noise - s * x0)).mean())
    assert diffusers_bug / loss > 1.2, diffusers_bug / loss  # measured 1.36 (vpsub x0) .. 2.9e6 (ve eps); vp v: 3.0 (gamma 5)
    simple = float(DDPMObjective(sde).loss(model, x0, None, _rng(n, seed=6)))
    assert abs(loss / simple - 1) > 0.05  # the weighting changed the loss ...
    unclipped = DDPMObjective(sde, weighting="min_snr", snr_gamma=1e30).loss(model, x0, None, _rng(n, seed=6))
    assert float(unclipped) == simple  # ... and gamma >= every SNR is the simple loss


# ----------------------------------------------------------------------------- configs and a real run


def test_configs_choose_the_edm_parameterization_and_refuse_what_cannot_train(tmp_path):
    cfg = compose_train(tmp_path, [*tiny_overrides("unet"), "objective=edm", "denoiser.sigma_data=0.7"])
    validate(cfg, "train")
    obj = build_objective(cfg, build_sde(cfg))
    assert (obj.p_mean, obj.p_std, obj.sigma_data) == (-1.2, 1.2, 0.7)  # sigma_data follows denoiser.sigma_data
    validate(compose_train(tmp_path, [*tiny_overrides("unet"), "denoiser.prediction=edm"]), "train")  # ddpm trains it too
    validate(compose_train(tmp_path, [*tiny_overrides("unet"), "objective=edm", "denoiser.prediction=v"]), "train")
    with pytest.raises(ConfigError, match="must be null, eps, x0, v, score, flow or edm with objective=edm, got consistency"):
        validate(compose_train(tmp_path, [*tiny_overrides("unet"), "objective=edm", "denoiser.prediction=consistency"]), "train")
    with pytest.raises(ConfigError, match="objective.p_std must be > 0"):
        validate(compose_train(tmp_path, [*tiny_overrides("unet"), "objective=edm", "objective.p_std=0"]), "train")
    cfg = compose_train(tmp_path, [*tiny_overrides("unet"), "objective.snr_gamma=3"])
    validate(cfg, "train")
    with pytest.raises(ConfigError, match="snr_gamma is read with objective.weighting=min_snr only"):
        build_objective(cfg, build_sde(cfg))
    cfg = compose_train(tmp_path, [*tiny_overrides("unet"), "objective.weighting=min_snr"])
    assert build_objective(cfg, build_sde(cfg)).snr_gamma == 5.0


@pytest.mark.parametrize("sde", ["vp", "ve"])
def test_train_objective_edm_then_sample_from_its_checkpoint(tmp_path, sde):
    run = tmp_path / "run"
    result = run_train(run, [*tiny_overrides("unet"), "objective=edm", f"sde={sde}"])
    assert result["global_step"] == 3 and math.isfinite(result["loss"])
    stored = load_ckpt(run / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]
    assert stored["denoiser"]["prediction"] == "edm" and stored["objective"]["_target_"].endswith("EDMObjective")
    model, _ = load_denoiser(run)
    assert model.parameterization.name == "edm"
    run_sample(tmp_path / "s", [f"ckpt={run}", "num_samples=4", "batch_size=4", "steps=3", "metrics.names=[]", "sampler=ode"])
    samples = np.load(tmp_path / "s" / "samples.npz")["samples"]
    assert samples.shape[0] == 4 and np.isfinite(samples.astype(np.float64)).all()
