"""objective=regression (SR3's one-step regression baseline): its loss is the x0 MSE at t = T on a prior
draw, it learns the conditional mean, and sampler=ddim steps=1 returns its x0 prediction in one call."""

import pytest
import torch
from torch import nn

from diffctl.denoiser import compose
from diffctl.image_conditions import SOURCE, SuperResolution
from diffctl.objectives import RegressionObjective
from diffctl.rng import BatchRandom
from diffctl.samplers.ddim import ddim
from diffctl.sde import VESDE, VPSDE


class PixelNet(nn.Module):
    """A 1x1 convolution over (x_t, source): a regressor whose optimum is known in closed form."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 1)
        self.calls = 0

    def forward(self, x, noise_label, class_labels=None):
        self.calls += 1
        return self.conv(x)


def _model(sde):
    return compose(PixelNet(), sde, "x0", conditioner=SuperResolution(1, 4, factor=2))


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 10.0)], ids=["vp", "ve"])
def test_loss_is_the_x0_mse_of_the_network_on_a_prior_draw(sde):
    torch.manual_seed(0)
    model = _model(sde)
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    cond = model.conditioner.from_batch({"image": x0})
    loss = RegressionObjective(sde).loss(model, x0, cond, BatchRandom(3, 0, 0, 0, 1, 6, "cpu"))
    # by hand: the same draws, scaled to the prior's std; the conv sees [x, source], and x0 = its output
    noise = BatchRandom(3, 0, 0, 0, 1, 6, "cpu").randn(x0.shape)
    x = noise * sde.prior_std()
    w, b = model.net.conv.weight.view(2), model.net.conv.bias
    alpha, sigma = sde.alpha(torch.tensor(sde.T)), sde.sigma(torch.tensor(sde.T))
    inp = x / torch.sqrt(alpha**2 * 0.5**2 + sigma**2)  # EDM's c_in with sigma_data = 0.5 (compose's default)
    out = w[0] * inp + w[1] * cond[SOURCE] + b
    assert float(loss.detach()) == pytest.approx(float((out - x0).pow(2).mean()), rel=1e-5)


def test_trained_regressor_learns_the_conditional_mean_and_samples_in_one_call():
    """Constant images c + independent pixel noise: the source (bicubic down/up of the image) is c plus
    the noise filtered, and E[x0 | source] is linear in it. We check the learned map against the
    least-squares solution over the same (x_T, source) features, computed in closed form."""
    torch.manual_seed(0)
    sde = VPSDE()
    model = _model(sde)
    objective = RegressionObjective(sde)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(400):
        x0 = (torch.rand(64, 1, 1, 1) - 0.5).expand(64, 1, 4, 4).contiguous()
        cond = model.conditioner.from_batch({"image": x0})
        loss = objective.loss(model, x0, cond, BatchRandom(0, step, 0, 0, 1, 64, "cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = model.net.conv.weight.view(2).detach()
    # x0 = source exactly here (bicubic of a constant is that constant), and x_T is independent of it:
    # the conditional mean is the source itself, so the noise weight goes to 0 and the source weight to 1
    assert abs(float(w[0])) < 0.02 and float(w[1]) == pytest.approx(1.0, abs=0.02)
    assert abs(float(model.net.conv.bias)) < 0.02
    # one DDIM step from the prior at T returns the x0 prediction at that draw, with one network call
    x0 = (torch.rand(5, 1, 1, 1) - 0.5).expand(5, 1, 4, 4).contiguous()
    cond = model.conditioner.from_batch({"image": x0})
    x = torch.randn(5, 1, 4, 4) * sde.prior_std()
    model.net.calls = 0
    out = ddim(model, x, 1, cond, None)  # eta = 0 draws no noise
    assert model.net.calls == 1
    with torch.no_grad():
        expected = model(x, torch.full((5,), sde.T), cond).x0
    assert torch.equal(out, expected)
    assert torch.allclose(out, x0, atol=0.03)
