"""Parameterization conversions, objectives against oracle predictors, and reproducible randomness."""

import math

import pytest
import torch

from diffctl.denoiser import Prediction, compose
from diffctl.parameterization import split as split_prediction
from diffctl.networks import UNet
from diffctl.objectives import ConsistencyObjective, DDPMObjective, NCSNObjective
from diffctl.rng import BatchRandom, GlobalBatchSampler
from diffctl.sde import SubVPSDE, VESDE, VPSDE, broadcast

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
    d = compose(_perturbed_unet(), sde, prediction="consistency")
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
    d = compose(net, sde, prediction="score", scale_input=False)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8])
    raw = net(x, 1000 * t)
    torch.testing.assert_close(d(x, t).score, raw / sde.sigma(t).reshape(-1, 1, 1, 1))


class OracleDenoiser:
    """Exact predictions for a data distribution that is a single point x_star."""

    def __init__(self, sde, x_star, eps_bias=0.0):
        self.sde, self.x_star, self.eps_bias = sde, x_star, eps_bias

    def __call__(self, x, t, cond=None):
        alpha, sigma = broadcast(self.sde.alpha(t), x), broadcast(self.sde.sigma(t), x)
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


@pytest.mark.parametrize("s0,s1,mu0", [(2, 150, 0.9), (2, 200, 0.95), (18, 18, 0.95), (10, 40, 0.99)])
def test_target_decay_rules_follow_the_paper_and_the_reference_code(s0, s1, mu0):
    """paper: N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1 and mu(k) = exp(s0 log mu0 / N(k))
    (Song et al. 2023, appendix C). code: openai/consistency_models' create_ema_and_scales_fn
    (scale_mode=progressive, target_ema_mode=adaptive), which takes the decay from the count before
    its final +1: scales = max(ceil(sqrt(...) - 1), 1), mu = exp(-c / scales), c = -log(mu0) s0, N = scales + 1."""
    K = 700
    sde = VESDE(0.002, 80.0)
    paper = ConsistencyObjective(sde, num_scales_start=s0, num_scales_end=s1, target_decay_start=mu0, total_steps=K)
    code = ConsistencyObjective(sde, num_scales_start=s0, num_scales_end=s1, target_decay_start=mu0, total_steps=K,
                                target_decay_rule="code")
    for k in [0, 1, 2, 5, 50, 333, 699, 700, 900]:
        kk = min(k, K)
        n_paper = math.ceil(math.sqrt(kk / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
        scales = max(math.ceil(math.sqrt(kk / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1), 1)
        assert paper.num_scales(k) == code.num_scales(k) == n_paper == scales + 1, k
        assert paper.target_decay(k) == pytest.approx(math.exp(s0 * math.log(mu0) / n_paper), rel=1e-12), k
        assert code.target_decay(k) == pytest.approx(math.exp(math.log(mu0) * s0 / scales), rel=1e-12), k
    assert paper.target_decay(0) == pytest.approx(mu0)  # the paper's mu(0) is mu0; the code's is mu0^(s0/(s0-1))
    assert code.target_decay(0) == pytest.approx(mu0 ** (s0 / (s0 - 1)))
    if s0 == s1:  # e.g. CD's 18: N = s0 at step 0 only, s0 + 1 after (as conf/objective/consistency.yaml says)
        assert [paper.num_scales(k) for k in (0, 1, K)] == [s0, s0 + 1, s0 + 1]
        assert paper.target_decay(1) == pytest.approx(mu0 ** (s0 / (s0 + 1))) and code.target_decay(1) == pytest.approx(mu0)
    with pytest.raises(ValueError, match="target_decay_rule"):
        ConsistencyObjective(sde, target_decay_rule="reference")


# --- Gaussian data: the probability-flow ODE and the consistency function in closed form ---------
# x0 ~ N(M, V I). In the VE variables y = x/alpha, s = sigma/alpha, y ~ N(M, (V + s^2) I), the exact
# denoiser is D(y, s) = M + V/(V + s^2) (y - M), and the PF-ODE dy/ds = (y - D)/s = s (y - M)/(V + s^2)
# has the solution (y - M) proportional to sqrt(V + s^2). So the consistency function, the PF-ODE map
# from s down to s_min, is f(y, s) = M + sqrt((V + s_min^2)/(V + s^2)) (y - M).
M, V = 0.3, 0.25


def _ve_variables(sde, x, t):
    return x / broadcast(sde.alpha(t), x), broadcast(sde.noise_ratio(t), x)


def gaussian_denoiser(sde):
    def denoise(x, t, cond=None):
        y, s = _ve_variables(sde, x, t)
        return Prediction(x0=M + V / (V + s * s) * (y - M), eps=torch.zeros_like(x), sigma=torch.ones(1))

    return denoise


def gaussian_consistency_function(sde):
    s_min = float(sde.noise_ratio(torch.tensor(sde.eps, dtype=torch.float64)))

    def f(x, t, cond=None):
        y, s = _ve_variables(sde, x, t)
        return Prediction(x0=M + torch.sqrt((V + s_min**2) / (V + s * s)) * (y - M), eps=torch.zeros_like(x), sigma=torch.ones(1))

    return f


def _gaussian_consistency_loss(sde, n_scales, teacher):
    obj = ConsistencyObjective(sde, num_scales_start=n_scales, num_scales_end=n_scales, total_steps=1)
    obj.teacher = teacher
    n = 4096
    x0 = M + math.sqrt(V) * torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = gaussian_consistency_function(sde)
    return float(obj.loss(f, x0, None, _rng(n), target=f, step=0))


@pytest.mark.parametrize("name", list(SDES))
def test_distillation_loss_of_the_exact_consistency_function_vanishes_at_heuns_order(name):
    """With the exact teacher, the online output f(y_{n+1}, s_{n+1}) is the exact ODE map and the target
    f(Heun(y_{n+1}), s_n) differs from it only by Heun's local error O(h^3): the squared loss falls as
    h^6 ~ N^-6, 64x per doubling of N. An Euler step (N^-4: 16x), a target or online call at the other
    level, or the target evaluated at y_{n+1} (all O(h): 4x) fall slower and are larger."""
    sde = SDES[name]
    losses = [_gaussian_consistency_loss(sde, n, gaussian_denoiser(sde)) for n in (20, 40)]
    assert 0 < losses[1] < 1e-6, losses  # measured: vp 1.5e-7, vpsub 2.6e-7, ve 4.8e-9
    assert losses[0] / losses[1] > 40, losses  # measured 71, 75, 80


@pytest.mark.parametrize("name", list(SDES))
def test_training_loss_of_the_exact_consistency_function_vanishes_as_the_steps_shrink(name):
    """CT replaces the teacher step by y_n = x0 + s_n z with the noise z of y_{n+1}: for one sample
    f(y_{n+1}, s_{n+1}) - f(y_n, s_n) = (g_{n+1} - g_n)(x0 - M) + (g_{n+1} s_{n+1} - g_n s_n) z with
    g = sqrt((V + s_min^2)/(V + s^2)), which is O(h), so the loss is not zero but falls as N^-2.
    Independent noise for y_n (or no shared x0) would leave an O(1) loss that does not shrink."""
    sde = SDES[name]
    losses = [_gaussian_consistency_loss(sde, n, None) for n in (20, 40, 80)]
    for coarse, fine in zip(losses, losses[1:]):
        assert 3.0 < coarse / fine < 5.5, losses
    assert 0 < losses[-1] < 1e-3, losses


def test_distillation_teacher_step_is_heuns_method_on_the_gaussian_pf_ode():
    """Data N(0, sd^2): the exact denoiser is y sd^2/(sd^2+s^2), so the PF-ODE is dy/ds = y s/(sd^2+s^2)
    and every one-step method multiplies y by a factor. Heun's factor is 1 + h/2 (k1 + k2 (1 + h k1))
    with k = s/(sd^2+s^2) at the two ends; the exact one is sqrt((sd^2+s_lo^2)/(sd^2+s_hi^2)), which
    Heun matches to O(h^3): halving h cuts its error ~8x (an Euler step's only ~4x)."""
    sd = 0.5
    sde = VESDE(0.002, 80.0)
    obj = ConsistencyObjective(sde)
    obj.teacher = lambda x, t, labels=None: Prediction(
        x0=x * sd**2 / (sd**2 + broadcast(sde.sigma(t), x) ** 2), eps=torch.zeros_like(x), sigma=torch.ones(1)
    )
    y = torch.randn(8, 3, dtype=torch.float64)
    k = lambda s: s / (sd**2 + s**2)  # noqa: E731

    def step(s_hi, s_lo):
        s_hi_t, s_lo_t = torch.full((8,), s_hi, dtype=torch.float64), torch.full((8,), s_lo, dtype=torch.float64)
        t_hi, t_lo = sde.t_from_noise_ratio(s_hi_t), sde.t_from_noise_ratio(s_lo_t)
        got = obj._teacher_step(y, s_hi_t, s_lo_t, t_hi, t_lo, None)
        h = s_lo - s_hi
        heun = 1 + h / 2 * (k(s_hi) + k(s_lo) * (1 + h * k(s_hi)))
        torch.testing.assert_close(got, y * heun, rtol=1e-12, atol=0)
        return abs(heun / math.sqrt((sd**2 + s_lo**2) / (sd**2 + s_hi**2)) - 1)

    # Bounds 1.5x Heun's measured relative errors 8.1e-5, 1.9e-5, 1.2e-4 (an Euler step's: 9.4e-4, 7.8e-5, 2.9e-3).
    for (s_hi, s_lo), bound in zip([(1.0, 0.9), (10.0, 8.0), (0.3, 0.25)], [1.2e-4, 3e-5, 1.9e-4]):
        error, half = step(s_hi, s_lo), step(s_hi, (s_hi + s_lo) / 2)
        assert 0 < error < bound, (s_hi, error)
        assert 6.0 < error / half < 13.0, (s_hi, error / half)  # measured 9.0, 11.4, 8.1 (Euler: 4.4, 5.1, 4.2)


class _DropoutOnly(torch.nn.Module):
    """A backbone whose output is only a dropout mask of a constant: equal outputs iff equal masks."""

    def __init__(self, p):
        super().__init__()
        self.drop = torch.nn.Dropout(p)

    def forward(self, x, noise_label, cond=None):
        return self.drop(torch.ones_like(x))


def _dropout_masks(module):
    masks = []
    hooks = [m.register_forward_hook(lambda mod, args, out: masks.append(out == 0))
             for m in module.modules() if isinstance(m, torch.nn.Dropout)]
    return masks, hooks


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA generator is checked where there is a GPU"))])
@pytest.mark.parametrize("teacher", [False, True], ids=["ct", "cd"])
def test_consistency_target_draws_the_online_dropout_masks(device, teacher):
    """The target network runs in train mode from the RNG state the online call started from (as in
    the reference), so it sees the same dropout masks; the next step's draws still differ."""
    import copy

    sde = VESDE(0.01, 10.0)
    x0 = torch.randn(4, 1, 8, 8, device=device)
    obj = ConsistencyObjective(sde, num_scales_start=10, num_scales_end=10, total_steps=1)
    obj.teacher = gaussian_denoiser(sde) if teacher else None
    # Only masks reach the output: the loss is 0 exactly when both networks drew the same ones.
    online = compose(_DropoutOnly(0.5), sde, prediction="x0").to(device)
    torch.manual_seed(0)
    assert float(obj.loss(online, x0, None, BatchRandom(0, 0, 0, 0, 1, 4, device), target=copy.deepcopy(online), step=0)) == 0.0
    # A real U-Net with dropout: online and target masks recorded at every dropout layer.
    net = UNet(in_channels=1, resolution=8, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.5)
    online = compose(net, sde, prediction="consistency").to(device).train()
    target = copy.deepcopy(online).requires_grad_(False)
    (online_masks, h1), (target_masks, h2) = _dropout_masks(online), _dropout_masks(target)
    torch.manual_seed(1)
    for _ in range(2):
        obj.loss(online, x0, None, BatchRandom(0, 0, 0, 0, 1, 4, device), target=target, step=0)
    for h in h1 + h2:
        h.remove()
    layers = sum(isinstance(m, torch.nn.Dropout) for m in net.modules())
    assert layers > 1 and len(online_masks) == len(target_masks) == 2 * layers
    for a, b in zip(online_masks, target_masks):
        assert torch.equal(a, b)
        assert 0.3 < float(a.float().mean()) < 0.7  # dropout p=0.5 was active in both
    assert not torch.equal(online_masks[0], online_masks[layers])  # the second loss call drew new masks


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
