"""Parameterization conversions, objectives against oracle predictors, and reproducible randomness."""

import math

import pytest
import torch

from diffctl.denoiser import Denoiser, Prediction, split_prediction
from diffctl.networks import UNet
from diffctl.objectives import ConsistencyObjective, DDPMObjective, NCSNObjective
from diffctl.rng import BatchRandom, GlobalBatchSampler
from diffctl.sde import SubVPSDE, VESDE, VPSDE, _bcast

SDES = {"vp": VPSDE(), "vpsub": SubVPSDE(), "ve": VESDE(0.01, 10.0)}


def _rng(n, seed=0, rank=0, world=1):
    return BatchRandom(seed, 0, 0, rank, world, n, "cpu")


@pytest.mark.parametrize("alpha,sigma", [(0.9, 0.3), (1.0, 50.0), (0.01, 0.999), (0.6, 0.16)])
def test_split_prediction_recovers_x0_and_eps_for_every_kind(alpha, sigma):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    a, s = torch.tensor(alpha), torch.tensor(sigma)
    x = a * x0 + s * eps
    outputs = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s}
    for kind, out in outputs.items():
        got_x0, got_eps = split_prediction(kind, out, x, a, s)
        torch.testing.assert_close(got_x0, x0, rtol=1e-4, atol=1e-4 * max(1.0, sigma / alpha))
        torch.testing.assert_close(got_eps, eps, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown prediction"):
        split_prediction("noise", eps, x, a, s)


def _perturbed_unet(seed=0):
    torch.manual_seed(seed)
    net = UNet(in_channels=1, resolution=8, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    with torch.no_grad():  # zero-initialised output layers would hide the parameterization
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("name", list(SDES))
def test_consistency_boundary_condition_is_exact(name):
    sde = SDES[name]
    d = Denoiser(_perturbed_unet(), sde, prediction="consistency")
    x = torch.randn(3, 1, 8, 8)
    t = torch.full((3,), sde.eps)
    out = d(x, t).x0
    expected = x / sde.alpha(t).reshape(-1, 1, 1, 1)
    assert torch.equal(out, expected) or torch.allclose(out, expected, rtol=0, atol=1e-7)
    if name == "ve":
        torch.testing.assert_close(out, x, rtol=0, atol=0)  # f(x, eps) = x, as in the paper
    later = d(x, torch.full((3,), 0.5)).x0
    assert (later - x / sde.alpha(torch.tensor(0.5))).abs().max() > 1e-3  # the network matters away from eps


def test_score_prediction_is_network_output_over_sigma():
    sde = VESDE(0.01, 10.0)
    net = _perturbed_unet()
    d = Denoiser(net, sde, prediction="score", scale_input=False)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8])
    raw = net(x, 1000 * t)
    torch.testing.assert_close(d(x, t).score, raw / sde.sigma(t).reshape(-1, 1, 1, 1))


class OracleDenoiser:
    """Exact predictions for a data distribution that is a single point x_star."""

    def __init__(self, sde, x_star, eps_bias=0.0):
        self.sde, self.x_star, self.eps_bias = sde, x_star, eps_bias

    def __call__(self, x, t, labels=None):
        alpha, sigma = _bcast(self.sde.alpha(t), x), _bcast(self.sde.sigma(t), x)
        eps = (x - alpha * self.x_star) / sigma + self.eps_bias
        return Prediction(x0=(x - sigma * eps) / alpha, eps=eps, sigma=sigma)


@pytest.mark.parametrize("name", list(SDES))
def test_ddpm_and_ncsn_losses_vanish_for_the_exact_predictor(name):
    sde = SDES[name]
    x_star = torch.randn(1, 1, 4, 4).expand(64, 1, 4, 4).contiguous()
    for objective in (DDPMObjective(sde), NCSNObjective(sde)):
        assert float(objective.loss(OracleDenoiser(sde, x_star), x_star, None, _rng(64))) < 1e-8
    # A constant error of 0.1 in eps costs exactly 0.01 under the simple loss and the sigma^2-weighted DSM loss.
    biased = OracleDenoiser(sde, x_star, eps_bias=0.1)
    assert float(DDPMObjective(sde).loss(biased, x_star, None, _rng(64))) == pytest.approx(0.01, rel=1e-3)
    assert float(NCSNObjective(sde).loss(biased, x_star, None, _rng(64))) == pytest.approx(0.01, rel=1e-3)


def test_likelihood_weighting_is_g2_over_sigma2():
    sde = VPSDE()
    x_star = torch.zeros(256, 2)
    biased = OracleDenoiser(sde, x_star, eps_bias=0.1)
    rng = _rng(256, seed=3)
    t = sde.eps + (sde.T - sde.eps) * _rng(256, seed=3).stratified_uniform(256)
    expected = (0.01 * (sde.diffusion(t) / sde.sigma(t)) ** 2).mean()
    got = DDPMObjective(sde, weighting="likelihood").loss(biased, x_star, None, rng)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_consistency_schedule_follows_the_paper():
    obj = ConsistencyObjective(VESDE(0.002, 80.0, eps=1e-9), num_scales_start=2, num_scales_end=150, total_steps=1000)
    assert obj.num_scales(0) == 2 and obj.num_scales(1000) == 151
    ns = [obj.num_scales(k) for k in range(0, 1001, 50)]
    assert ns == sorted(ns)
    assert obj.target_decay(0) == pytest.approx(0.9)
    assert obj.target_decay(1000) == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    # Karras et al.'s boundaries for sigma in [0.002, 80], rho = 7, N = 18 (EDM's defaults).
    n, lo, hi = 18, 0.002, 80.0
    edm = [(lo ** (1 / 7) + i / (n - 1) * (hi ** (1 / 7) - lo ** (1 / 7))) ** 7 for i in range(n)]
    torch.testing.assert_close(obj.boundaries(n), torch.tensor(edm, dtype=torch.float64), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", list(SDES))
def test_consistency_training_loss_vanishes_for_the_true_consistency_function(name):
    """For a point mass the consistency function maps every x_t to x_star: the CT loss is 0,
    and a wrong function gives a positive loss."""
    sde = SDES[name]
    x_star = torch.randn(1, 1, 4, 4).expand(32, 1, 4, 4).contiguous()
    obj = ConsistencyObjective(sde, total_steps=10)
    exact = lambda x, t, labels=None: Prediction(x0=x_star, eps=torch.zeros_like(x), sigma=torch.ones(1))
    assert float(obj.loss(exact, x_star, None, _rng(32), target=exact, step=5)) == 0.0
    identity = lambda x, t, labels=None: Prediction(x0=x, eps=torch.zeros_like(x), sigma=torch.ones(1))
    assert float(obj.loss(identity, x_star, None, _rng(32), target=identity, step=5)) > 1e-6


def test_distillation_teacher_step_solves_the_gaussian_pf_ode():
    """Data N(0, sd^2): the exact denoiser is y sd^2/(sd^2+s^2) and the PF-ODE solution is
    y(s) proportional to sqrt(sd^2 + s^2). One Heun step must match it to O(h^3)."""
    sd = 0.5
    sde = VESDE(0.002, 80.0)
    obj = ConsistencyObjective(sde)
    obj.teacher = lambda x, t, labels=None: Prediction(
        x0=x * sd**2 / (sd**2 + _bcast(sde.sigma(t), x) ** 2), eps=torch.zeros_like(x), sigma=torch.ones(1)
    )
    y = torch.randn(8, 3, dtype=torch.float64)
    for s_hi, s_lo in [(1.0, 0.9), (10.0, 8.0), (0.3, 0.25)]:
        s_hi_t, s_lo_t = torch.full((8,), s_hi, dtype=torch.float64), torch.full((8,), s_lo, dtype=torch.float64)
        t_hi, t_lo = sde.t_from_noise_ratio(s_hi_t), sde.t_from_noise_ratio(s_lo_t)
        got = obj._teacher_step(y, s_hi_t, s_lo_t, t_hi, t_lo, None)
        exact = y * math.sqrt((sd**2 + s_lo**2) / (sd**2 + s_hi**2))
        assert float((got - exact).abs().max() / exact.abs().max()) < 2e-3


def test_batch_random_ranks_partition_the_global_draw():
    world, local = 3, 4
    single = BatchRandom(7, 11, 0, 0, 1, world * local, "cpu")
    parts = [BatchRandom(7, 11, 0, r, world, local, "cpu") for r in range(world)]
    torch.testing.assert_close(torch.cat([p.randn((local, 2)) for p in parts]), single.randn((world * local, 2)))
    torch.testing.assert_close(torch.cat([p.stratified_uniform(local) for p in parts]), single.stratified_uniform(world * local))
    u = single.stratified_uniform(12)  # (stratified: one draw in each twelfth of [0, 1))
    assert sorted((u * 12).floor().int().tolist()) == list(range(12))
    other_step = BatchRandom(7, 12, 0, 0, 1, world * local, "cpu")
    assert not torch.equal(other_step.randn((12, 2)), BatchRandom(7, 11, 0, 0, 1, 12, "cpu").randn((12, 2)))


def test_global_batch_sampler_shards_each_global_batch():
    n, b, world = 50, 4, 3
    single = list(GlobalBatchSampler(n, b * world, seed=5))
    ranks = [list(GlobalBatchSampler(n, b, rank=r, world_size=world, seed=5)) for r in range(world)]
    assert len(single) == n // (b * world) == len(ranks[0])
    for k, batch in enumerate(single):
        assert batch == sum((ranks[r][k] for r in range(world)), [])
    flat = sum(single, [])
    assert len(set(flat)) == len(flat)  # no sample twice in an epoch
    s = GlobalBatchSampler(n, b * world, seed=5)
    s.skip = 2
    assert list(s) == single[2:] and list(s) == single  # skipping only applies to the first pass
    s.set_epoch(1)
    assert list(s) != single
