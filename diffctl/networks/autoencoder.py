"""KL-regularized convolutional autoencoder (LDM's AutoencoderKL, Rombach et al. 2022).

The module tree, and so every state-dict key and shape, is that of diffusers' `AutoencoderKL` with
DownEncoderBlock2D / UpDecoderBlock2D blocks (the layout of every Stable Diffusion VAE), so a diffusers
folder's weights load with `load_state_dict(strict=True)` and no diffusers at run time
(diffctl/first_stage.py reads the folder). The architecture:

  encoder: conv_in 3x3 -> per level [ResNet x layers_per_block, then a stride-2 3x3 conv on the input
           padded by one row and column at the bottom/right only, except on the last level]
           -> mid [ResNet, single-head self-attention, ResNet] -> GroupNorm, SiLU, conv_out 3x3 to
           2 * latent_channels (mean, log-variance) -> quant_conv 1x1
  decoder: post_quant_conv 1x1 -> conv_in 3x3 -> mid -> per level, widest first [ResNet x
           (layers_per_block + 1), then nearest 2x upsampling and a 3x3 conv, except on the last level]
           -> GroupNorm, SiLU, conv_out 3x3

ResNet blocks are pre-activation (GroupNorm, SiLU, conv) twice with a 1x1 shortcut when the width
changes; every GroupNorm has eps 1e-6. The downsampling factor is f = 2 ** (len(block_out_channels) - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffctl.errors import ConfigError
from diffctl.networks.posterior import DiagonalGaussian

EPS = 1e-6  # every GroupNorm's epsilon in LDM's and diffusers' autoencoders


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=EPS)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention(nn.Module):
    """One head over all H*W positions, GroupNorm first, residual; scale 1/sqrt(channels)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list: diffusers' key is to_out.0

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [N, HW, C]
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=c**-0.5)[:, 0]
        return x + self.to_out[0](out).transpose(1, 2).reshape(n, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        # without attention diffusers keeps no `attentions` parameters at all: an empty list has no keys
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # LDM pads only the bottom and right: the trained weights expect exactly this alignment
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, in_channels: int, latent_channels: int, widths: tuple[int, ...], layers: int, groups: int, attention: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], width, layers, groups, downsample=i < len(widths) - 1) for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups, attention)
        self.conv_norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, latent_channels: int, out_channels: int, widths: tuple[int, ...], layers: int, groups: int, attention: bool):
        super().__init__()
        rev = widths[::-1]
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, attention)
        # one ResNet more per level than the encoder, as LDM's decoder
        self.up_blocks = nn.ModuleList(
            UpBlock(rev[max(i - 1, 0)], width, layers + 1, groups, upsample=i < len(rev) - 1) for i, width in enumerate(rev)
        )
        self.conv_norm_out = _norm(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r}: must be a positive integer")
    return value


class AutoencoderKL(nn.Module):
    """`encode(x) -> DiagonalGaussian` over latents [N, latent_channels, H/f, W/f]; `decode(z) -> x`;
    `forward(x) -> (reconstruction, posterior)`. Arguments are diffusers' AutoencoderKL config keys of the
    same names; `config` holds them (what diffctl/first_stage.py saves). scaling_factor and shift_factor
    are the stored latent normalization, z_diffusion = (z - shift) * scale (`normalize` / `denormalize`)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] | list[int] = (64,),
        layers_per_block: int = 1,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
    ):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("out_channels", out_channels), ("layers_per_block", layers_per_block),
                           ("latent_channels", latent_channels), ("norm_num_groups", norm_num_groups)):  # fmt: skip
            _positive_int(key, value)
        if isinstance(block_out_channels, (str, bytes)) or not hasattr(block_out_channels, "__len__") or not len(block_out_channels):
            raise ConfigError(f"block_out_channels={block_out_channels!r}: must be a non-empty list of widths, one per level")
        widths = tuple(_positive_int("block_out_channels", w) for w in block_out_channels)
        bad = [w for w in widths if w % norm_num_groups]
        if bad:
            raise ConfigError(f"norm_num_groups={norm_num_groups} does not divide block_out_channels width {bad[0]} (GroupNorm needs it to)")
        for key, value in (("mid_block_add_attention", mid_block_add_attention), ("use_quant_conv", use_quant_conv),
                           ("use_post_quant_conv", use_post_quant_conv)):  # fmt: skip
            if not isinstance(value, bool):
                raise ConfigError(f"{key}={value!r}: must be true or false")
        for key, value in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)):
            if (value is not None or key == "scaling_factor") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{key}={value!r}: must be a number{' or null' if key == 'shift_factor' else ''}")
        if scaling_factor <= 0:
            raise ConfigError(f"scaling_factor={scaling_factor!r}: must be positive")
        self.config = {
            "in_channels": in_channels, "out_channels": out_channels, "block_out_channels": list(widths),
            "layers_per_block": layers_per_block, "latent_channels": latent_channels, "norm_num_groups": norm_num_groups,
            "mid_block_add_attention": mid_block_add_attention, "use_quant_conv": use_quant_conv,
            "use_post_quant_conv": use_post_quant_conv, "scaling_factor": float(scaling_factor),
            "shift_factor": None if shift_factor is None else float(shift_factor),
        }  # fmt: skip
        self.factor = 2 ** (len(widths) - 1)
        self.latent_channels = latent_channels
        self.scaling_factor, self.shift_factor = float(scaling_factor), shift_factor
        self.encoder = Encoder(in_channels, latent_channels, widths, layers_per_block, norm_num_groups, mid_block_add_attention)
        self.decoder = Decoder(latent_channels, out_channels, widths, layers_per_block, norm_num_groups, mid_block_add_attention)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    def latent_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int]:
        """(latent_channels, H/f, W/f) for images [channels, H, W]; ConfigError if they cannot go through."""
        if channels != self.config["in_channels"]:
            raise ConfigError(f"{channels}-channel images for an autoencoder of in_channels={self.config['in_channels']}")
        if height % self.factor or width % self.factor:
            raise ConfigError(f"{height}x{width} images: the autoencoder downsamples by f={self.factor} "
                              f"(block_out_channels has {len(self.config['block_out_channels'])} levels), so height and width must be multiples of {self.factor}")  # fmt: skip
        return self.latent_channels, height // self.factor, width // self.factor

    def encode(self, x: Tensor) -> DiagonalGaussian:
        moments = self.encoder(x)
        return DiagonalGaussian(moments if self.quant_conv is None else self.quant_conv(moments))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def forward(self, x: Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """(decode of a posterior draw, or of its mode by default, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def normalize(self, z: Tensor) -> Tensor:
        """Latents as a diffusion model sees them (diffusers pipelines' (z - shift_factor) * scaling_factor)."""
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def denormalize(self, z: Tensor) -> Tensor:
        return z / self.scaling_factor + (self.shift_factor or 0.0)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight: LDM's adaptive discriminator weight compares gradients at it."""
        return self.decoder.conv_out.weight
