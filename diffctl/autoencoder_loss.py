"""The KL autoencoder's training loss, in the manner of LDM's LPIPSWithDiscriminator (Rombach et al. 2022,
taming-transformers' VQGAN loss with a KL term):

  rec      = |x - x'| (or (x - x')^2) per pixel, + perceptual_weight * LPIPS(x, x') per image
  nll      = sum(rec / exp(logvar) + logvar) / N     (a learned scalar log-variance: a Laplace/Gaussian
                                                      decoder likelihood up to constants)
  loss     = nll + kl_weight * KL(q(z|x) || N(0, I)) / N + d_weight * g_loss   (g_loss = -mean D(x'))
  d_weight = clamp(||grad_last nll|| / (||grad_last g_loss|| + 1e-4), 0, 1e4) * disc_weight
             (gradients at the decoder's last weight: the adversarial term's size follows the
             reconstruction term's), and 0 before disc_start
  D loss   = hinge: (mean relu(1 - D(x)) + mean relu(1 + D(x'))) / 2, or vanilla with softplus; 0 before disc_start

The discriminator is pix2pix's PatchGAN (NLayerDiscriminator, Isola et al. 2017) with LDM's init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from diffctl.errors import ConfigError
from diffctl.networks.posterior import DiagonalGaussian

MAX_DISC_WEIGHT = 1e4  # LDM's clamp of the adaptive weight


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4x4 convs, stride 2 for the first n_layers, LeakyReLU 0.2, BatchNorm after all but the first
    and last; one logit per overlapping patch (70x70 pixels for n_layers=3)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last one keeps the resolution (pix2pix)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # LDM's / pix2pix's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float = 1.0) -> Tensor:
    """LDM's d_weight: the ratio of the two losses' gradient norms at `last_layer`, clamped, detached."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, MAX_DISC_WEIGHT).detach() * disc_weight


class AutoencoderLoss(nn.Module):
    """`generator_loss(x, recon, posterior, step, last_layer)` and `discriminator_loss(x, recon, step)`, each
    (loss, logs); `logvar` is a parameter to train with the autoencoder, the discriminator's with its own
    optimizer. lpips: a diffctl.lpips.LPIPS (or None); discriminator: None for no adversarial term."""

    def __init__(self, kl_weight: float = 1e-6, reconstruction: str = "l1", lpips: nn.Module | None = None,
                 perceptual_weight: float = 1.0, logvar_init: float = 0.0, discriminator: nn.Module | None = None,
                 disc_start: int = 0, disc_weight: float = 0.5, disc_factor: float = 1.0, disc_loss: str = "hinge"):  # fmt: skip
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ConfigError(f"reconstruction={reconstruction!r}: must be l1 or l2")
        if disc_loss not in D_LOSSES:
            raise ConfigError(f"disc_loss={disc_loss!r}: must be one of {', '.join(D_LOSSES)}")
        for key, value in (("kl_weight", kl_weight), ("perceptual_weight", perceptual_weight), ("disc_weight", disc_weight),
                           ("disc_factor", disc_factor), ("disc_start", disc_start)):  # fmt: skip
            if value < 0:
                raise ConfigError(f"{key}={value!r}: must be >= 0")
        self.kl_weight, self.reconstruction, self.perceptual_weight = kl_weight, reconstruction, perceptual_weight
        self.lpips, self.discriminator = lpips, discriminator
        self.disc_start, self.disc_weight, self.disc_factor, self.d_loss = disc_start, disc_weight, disc_factor, D_LOSSES[disc_loss]
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))

    def adversarial(self, step: int) -> bool:
        return self.discriminator is not None and self.disc_factor > 0 and step >= self.disc_start

    def reconstruction_loss(self, x: Tensor, recon: Tensor) -> Tensor:
        """Per pixel [N, C, H, W]: the L1 or L2 distance, plus the weighted LPIPS of each image."""
        rec = (x - recon).abs() if self.reconstruction == "l1" else (x - recon).square()
        if self.lpips is not None and self.perceptual_weight > 0:
            rec = rec + self.perceptual_weight * self.lpips(x, recon).view(-1, 1, 1, 1)
        return rec

    def generator_loss(self, x: Tensor, recon: Tensor, posterior: DiagonalGaussian, step: int,
                       last_layer: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        n = x.shape[0]
        rec = self.reconstruction_loss(x, recon)
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / n
        kl = posterior.kl().sum() / n
        loss = nll + self.kl_weight * kl
        logs = {"rec": rec.detach().mean(), "nll": nll.detach(), "kl": kl.detach(), "logvar": self.logvar.detach()}
        if self.adversarial(step):
            if last_layer is None:
                raise ValueError("the adversarial term needs last_layer (the autoencoder's `last_layer`) for its adaptive weight")
            # through detached parameters: the generator's term trains the autoencoder, never the discriminator
            # (one optimizer may hold both networks; LDM's separate optimizers zero these gradients instead)
            params = {k: p.detach() for k, p in self.discriminator.named_parameters()}
            g_loss = -functional_call(self.discriminator, params, (recon,)).mean()
            if torch.is_grad_enabled():
                d_weight = adaptive_weight(nll, g_loss, last_layer, self.disc_weight)
            else:  # validation: no graph to take gradients through, LDM uses 0 as well
                d_weight = torch.zeros((), device=x.device)
            loss = loss + d_weight * self.disc_factor * g_loss
            logs |= {"g_loss": g_loss.detach(), "d_weight": d_weight}
        return loss, logs | {"loss": loss.detach()}

    def discriminator_loss(self, x: Tensor, recon: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss on real x and detached reconstructions; 0 (no graph) before disc_start."""
        if not self.adversarial(step):
            zero = torch.zeros((), device=x.device)
            return zero, {"d_loss": zero}
        real, fake = self.discriminator(x.detach()), self.discriminator(recon.detach())
        loss = self.disc_factor * self.d_loss(real, fake)
        return loss, {"d_loss": loss.detach(), "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}
