"""The composed model's pieces: parameterizations (EDM-style scalings), conditioners, capabilities."""

from __future__ import annotations

import math

import pytest
import torch

from diffctl.conditioning import ClassConditioner, Conditioner, make_conditioner
from diffctl.denoiser import GuidedModel, compose
from diffctl.networks.gmm import GaussianMixture, MixtureModel
from diffctl.parameterization import PARAMETERIZATIONS, make_parameterization
from diffctl.rng import BatchRandom
from diffctl.sde import VESDE, VPSDE, SubVPSDE

SDES = {"vp": VPSDE(), "vpsub": SubVPSDE(), "ve": VESDE(0.02, 20.0)}


def _pair(sde, t):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    alpha, sigma = sde.alpha(t).reshape(-1, 1), sde.sigma(t).reshape(-1, 1)
    return x0, eps, alpha * x0 + sigma * eps, alpha, sigma


# What each kind's network must output for the true (x0, eps), from the definitions in the papers:
# eps (Ho et al.), x0, v = alpha eps - sigma x0 (Salimans & Ho), score = F / sigma = -eps / sigma (NCSN), edm.
TRUE_OUTPUT = {
    "eps": lambda x0, eps, a, s: eps,
    "x0": lambda x0, eps, a, s: x0,
    "v": lambda x0, eps, a, s: a * eps - s * x0,
    "score": lambda x0, eps, a, s: -eps,
    # EDM (Karras et al. Table 1, sigma_data 0.5) in y = x/a = x0 + r eps, r = s/a: F = (x0 - c_skip y)/c_out
    "edm": lambda x0, eps, a, s: (x0 - 0.25 / ((s / a) ** 2 + 0.25) * (x0 + s / a * eps)) / (0.5 * s / a / torch.sqrt(0.25 + (s / a) ** 2)),
}


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("kind", list(TRUE_OUTPUT))
def test_each_parameterization_maps_its_true_output_to_x0_and_eps(sde_name, kind):
    sde = SDES[sde_name]
    t = torch.tensor([0.01, 0.2, 0.4, 0.7, 1.0], dtype=torch.float64)
    x0, eps, x, a, s = _pair(sde, t)
    p = make_parameterization(kind, sde)
    out = TRUE_OUTPUT[kind](x0, eps, a, s)
    got_x0, got_eps = p.predict(out, x, t, a, s)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)
    c_skip, c_out = p.c_skip_out(t, a, s)  # EDM's form x0 = c_skip x + c_out F gives the same x0
    torch.testing.assert_close(c_skip * x + c_out * out, x0)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_consistency_scalings_meet_the_boundary_condition_and_edm_form(sde_name):
    sde = SDES[sde_name]
    p = make_parameterization("consistency", sde, sigma_data=0.5)
    t = torch.tensor([sde.eps, 0.3, 1.0], dtype=torch.float64)
    a, s = sde.alpha(t).reshape(-1, 1), sde.sigma(t).reshape(-1, 1)
    c_skip, c_out = p.ratio_scalings(t)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0  # f(x_eps, eps) = x_eps / alpha exactly
    x, out = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    got_x0, _ = p.predict(out, x, t, a, s)
    k_skip, k_out = p.c_skip_out(t, a, s)
    torch.testing.assert_close(k_skip * x + k_out * out, got_x0)
    # Song et al. 2023's c_skip(s) = sd^2 / ((s - s_min)^2 + sd^2), c_out = sd (s - s_min) / sqrt(sd^2 + s^2) in s = sigma/alpha
    ratio = s.reshape(-1) / a.reshape(-1)
    s_min = ratio[0]
    torch.testing.assert_close(c_skip, 0.25 / ((ratio - s_min) ** 2 + 0.25))
    torch.testing.assert_close(c_out, 0.5 * (ratio - s_min) / torch.sqrt(0.25 + ratio**2))


def test_input_scaling_gives_unit_variance_inputs_and_the_noise_label():
    sde = VESDE(0.02, 50.0)
    p = make_parameterization("eps", sde, sigma_data=0.5)
    t = torch.tensor([0.9], dtype=torch.float64)
    a, s = sde.alpha(t), sde.sigma(t)
    x = a * 0.5 * torch.randn(200_000, dtype=torch.float64) + s * torch.randn(200_000, dtype=torch.float64)
    assert float(p.network_input(x, a, s).std()) == pytest.approx(1.0, rel=0.01)
    torch.testing.assert_close(p.network_input(x, a, s), p.c_in(a, s) * x)
    assert float(p.c_noise(t)) == pytest.approx(900.0)
    off = make_parameterization("eps", sde, scale_input=False)
    assert torch.equal(off.network_input(x, a, s), x) and float(off.c_in(a, s)) == 1.0


def test_unknown_parameterization_is_refused():
    with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
        make_parameterization("noise", VPSDE())
    assert set(PARAMETERIZATIONS) == {"eps", "x0", "v", "score", "flow", "consistency", "edm"}


def test_class_conditioner_null_dropout_and_sampling_labels():
    c = ClassConditioner(10, dropout=0.3)
    cond = {"class_label": torch.arange(4000) % 10}
    assert torch.equal(c.null(cond)["class_label"], torch.full((4000,), 10))
    dropped = c.drop(cond, BatchRandom(0, 0, 0, 0, 1, 4000, "cpu"))["class_label"]
    rate = float((dropped == 10).double().mean())
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)  # Bernoulli(0.3) per label
    assert torch.equal(dropped[dropped != 10], cond["class_label"][dropped != 10])  # the rest untouched
    assert c.for_samples(7, 5, "cpu")["class_label"].tolist() == [7, 8, 9, 0, 1]
    assert c.for_samples(7, 3, "cpu", class_label=4)["class_label"].tolist() == [4, 4, 4]
    assert c.from_batch({"image": torch.zeros(2), "class_label": torch.tensor([1, 2])})["class_label"].tolist() == [1, 2]
    none = make_conditioner(0)
    assert type(none) is Conditioner and none.from_batch({"class_label": torch.tensor([1])}) == {} and none.null({}) == {}


def test_capabilities_say_what_each_model_can_do():
    from diffctl.networks import UNet

    net = UNet(in_channels=1, resolution=8, num_classes=3, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[])
    eps = compose(net, VPSDE(), "eps", label_dropout=0.1).capabilities
    assert (eps.pf_ode, eps.one_step, eps.default_sampler, eps.num_classes, eps.null_condition, eps.analytic) == (True, False, "ode", 3, True, False)
    assert eps.conditions == {"class_label"} and eps.data_range == (-1.0, 1.0)
    cm = compose(net, VPSDE(), "consistency").capabilities
    assert (cm.pf_ode, cm.default_sampler, cm.null_condition) == (False, "consistency", False)
    mix = MixtureModel(GaussianMixture([[0.0], [1.0]]), VPSDE(), conditional=True)
    can = mix.capabilities
    assert (can.analytic, can.data_range, can.num_classes, can.null_condition, mix.backbone) == (True, None, 2, True, None)
    assert MixtureModel(GaussianMixture([[0.0], [1.0]]), VPSDE()).capabilities.conditions == frozenset()


def test_guidance_takes_the_null_condition_from_the_conditioner():
    """CFG around the exact mixture: w = 0 is the whole mixture (null class), w = 1 the component."""
    mix = GaussianMixture([[-2.0], [3.0]], scales=[0.5, 0.5])
    model = MixtureModel(mix, VPSDE(), conditional=True)
    x, t = torch.tensor([[0.3], [0.3]]), torch.full((2,), 0.4)
    cond = {"class_label": torch.tensor([0, 1])}
    a, s = VPSDE().alpha(t), VPSDE().sigma(t)
    unconditional = mix.denoise(x, a, s)[0]
    conditional = mix.denoise(x, a, s, cond["class_label"])[0]
    torch.testing.assert_close(GuidedModel(model, 0.0)(x, t, cond).x0, unconditional.float())
    torch.testing.assert_close(GuidedModel(model, 1.0)(x, t, cond).x0, conditional.float())
    torch.testing.assert_close(GuidedModel(model, 2.0)(x, t, cond).x0, (2 * conditional - unconditional).float())
