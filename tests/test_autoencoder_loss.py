"""The autoencoder loss against closed forms and hand-written autograd: hinge/vanilla discriminator losses,
the learned-log-variance NLL, the KL term, LDM's adaptive discriminator weight, the disc_start switch, and
the PatchGAN's shape and parameter count from its architecture."""

from __future__ import annotations

import math

import pytest
import torch

from diffctl.autoencoder_loss import AutoencoderLoss, NLayerDiscriminator, adaptive_weight, hinge_d_loss, vanilla_d_loss
from diffctl.errors import ConfigError
from diffctl.networks.autoencoder import AutoencoderKL


def test_d_losses_closed_form():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 0.25])
    # hinge: relu(1 - r) = 0, 0.5, 2; relu(1 + f) = 0, 1, 1.25
    assert math.isclose(hinge_d_loss(real, fake).item(), 0.5 * (2.5 / 3 + 2.25 / 3), rel_tol=1e-6)
    want = 0.5 * (sum(math.log1p(math.exp(-r)) for r in real.tolist()) / 3 + sum(math.log1p(math.exp(f)) for f in fake.tolist()) / 3)
    assert math.isclose(vanilla_d_loss(real, fake).item(), want, rel_tol=1e-6)


def test_patchgan_shape_and_parameters():
    d = NLayerDiscriminator(3, ndf=64, n_layers=3)
    # convs 3->64 (bias), 64->128, 128->256, 256->512 (no bias, BatchNorm weight+bias), 512->1 (bias); all 4x4
    want = (3 * 64 * 16 + 64) + (64 * 128 * 16 + 256) + (128 * 256 * 16 + 512) + (256 * 512 * 16 + 1024) + (512 * 16 + 1)
    assert sum(p.numel() for p in d.parameters()) == want
    small = NLayerDiscriminator(3, ndf=4, n_layers=3)
    assert small(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # pix2pix's 30x30 patches of 70x70 pixels


def tiny(seed=0):
    torch.manual_seed(seed)
    ae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=2, norm_num_groups=4, mid_block_add_attention=False)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    return ae, x


def test_nll_and_kl_closed_form():
    ae, x = tiny()
    loss = AutoencoderLoss(kl_weight=0.1, reconstruction="l1", logvar_init=0.5)
    recon, posterior = ae(x)
    total, logs = loss.generator_loss(x, recon, posterior, step=0)
    n = x.shape[0]
    nll = ((x - recon).abs() / math.exp(0.5) + 0.5).sum() / n
    kl = (0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar)).sum() / n
    torch.testing.assert_close(logs["nll"], nll.detach())
    torch.testing.assert_close(total, nll + 0.1 * kl)
    l2 = AutoencoderLoss(kl_weight=0.0, reconstruction="l2")
    torch.testing.assert_close(l2.generator_loss(x, recon, posterior, 0)[0], (x - recon).square().sum() / n)
    # the learned log-variance gets a gradient: d/ds [r e^-s + s] = 1 - r e^-s, summed
    total.backward()
    torch.testing.assert_close(loss.logvar.grad, (1 - (x - recon).abs().detach() * math.exp(-0.5)).sum() / n)


class FakePerceptual(torch.nn.Module):
    def forward(self, a, b):
        return (a - b).square().flatten(1).mean(1)


def test_perceptual_term_is_per_image():
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    loss = AutoencoderLoss(lpips=FakePerceptual(), perceptual_weight=0.5)
    torch.testing.assert_close(loss.reconstruction_loss(x, y), torch.tensor([1.5, 4.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2))


def test_adaptive_weight_against_hand_autograd():
    ae, x = tiny(1)
    disc = NLayerDiscriminator(3, ndf=4, n_layers=1)
    loss = AutoencoderLoss(kl_weight=1e-3, discriminator=disc, disc_start=5, disc_weight=0.5)
    recon, posterior = ae(x)
    total, logs = loss.generator_loss(x, recon, posterior, step=5, last_layer=ae.last_layer)
    # by hand: gradients of the two terms at the decoder's last conv weight
    nll = ((x - recon).abs() + 0.0).sum() / 2
    g = -disc(recon).mean()
    gn = torch.autograd.grad(nll, ae.decoder.conv_out.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, ae.decoder.conv_out.weight, retain_graph=True)[0].norm()
    want = (gn / (gg + 1e-4)).clamp(0, 1e4) * 0.5
    torch.testing.assert_close(logs["d_weight"], want)
    kl = posterior.kl().sum() / 2
    torch.testing.assert_close(total, nll + 1e-3 * kl + want * g)
    # the clamp: a g_loss with no gradient at the last layer gives the upper bound
    w = adaptive_weight(nll, 0.0 * g, ae.last_layer)
    assert w.item() == 1e4
    # one optimizer may hold both networks (train-autoencoder): the generator's loss must not train the discriminator
    recon, posterior = ae(x)
    loss.generator_loss(x, recon, posterior, step=5, last_layer=ae.last_layer)[0].backward()
    assert ae.decoder.conv_out.weight.grad is not None and all(p.grad is None for p in disc.parameters())


def test_disc_start_and_discriminator_loss():
    ae, x = tiny(2)
    disc = NLayerDiscriminator(3, ndf=4, n_layers=1)
    loss = AutoencoderLoss(discriminator=disc, disc_start=10, disc_factor=2.0)
    recon, posterior = ae(x)
    before, logs = loss.generator_loss(x, recon, posterior, step=9, last_layer=ae.last_layer)
    assert "d_weight" not in logs and loss.discriminator_loss(x, recon, 9)[0].item() == 0.0
    d, _ = loss.discriminator_loss(x, recon, 10)
    torch.testing.assert_close(d, 2.0 * hinge_d_loss(disc(x), disc(recon)))
    d.backward()
    assert ae.decoder.conv_out.weight.grad is None  # the reconstructions were detached
    assert all(p.grad is not None for p in disc.parameters())
    with torch.no_grad():
        _, logs = loss.generator_loss(x, recon, posterior, step=10, last_layer=ae.last_layer)
    assert logs["d_weight"].item() == 0.0
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(x, recon, posterior, step=10)


def test_bad_settings():
    for kw, fragment in [({"reconstruction": "l3"}, "reconstruction='l3'"), ({"disc_loss": "wgan"}, "disc_loss='wgan'"),
                         ({"kl_weight": -1.0}, "kl_weight=-1.0")]:  # fmt: skip
        with pytest.raises(ConfigError, match=fragment):
            AutoencoderLoss(**kw)
