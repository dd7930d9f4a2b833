"""DDPM-style U-Net (Ho et al. 2020) with optional class conditioning."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffctl.networks.embeddings import ClassEmbedding, NoiseLevelEmbedding


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in DDPM (128+ channels). Narrower layers use fewer groups, keeping >= 4
    # channels per group: with 1 channel per group the norm would erase the per-channel
    # noise/class embedding added just before it.
    groups = max(g for g in range(1, 33) if channels % g == 0 and (channels // g >= 4 or g == 1))
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_(module: nn.Module) -> nn.Module:
    # Zero-init the last layer of a residual branch so each block starts as the identity.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the attention width {channels}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [B, heads, HW, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def encoder_blocks(
    base_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: set[int],
    dropout: float,
    num_heads: int,
    resample_with_conv: bool,
    resolution: int,
) -> tuple[nn.ModuleList, nn.ModuleList, list[int]]:
    """The U-Net's down path (after conv_in) and middle, shared with the noise-conditional classifier
    (ADM's encoder half, diffctl.networks.classifier): (down, mid, the channels of each skip
    connection; the last is the middle's width). Embedding width 4 * base_channels, as the U-Net's."""
    emb_dim = 4 * base_channels
    down = nn.ModuleList()
    skip_chs = [base_channels]
    ch, res = base_channels, resolution
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            down.append(ResBlock(ch, base_channels * mult, emb_dim, dropout))
            ch = base_channels * mult
            if res in attn_resolutions:
                down.append(AttnBlock(ch, num_heads))
            skip_chs.append(ch)
        if level != len(channel_mult) - 1:
            down.append(Downsample(ch, resample_with_conv))
            skip_chs.append(ch)
            res //= 2
    mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), AttnBlock(ch, num_heads), ResBlock(ch, ch, emb_dim, dropout)])
    return down, mid, skip_chs


class UNet(nn.Module):
    """Noise-prediction U-Net; `forward(x, noise_labels, class_labels=None)`.

    Layout follows DDPM: per level `num_res_blocks` res blocks on the way down (attention
    after each one at resolutions in `attn_resolutions`), res-attn-res in the middle, and
    `num_res_blocks + 1` blocks per level on the way up, each fed a skip connection.
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_classes: int = 0,
        out_channels: Optional[int] = None,
        resample_with_conv: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)  # Hydra hands over ListConfig
        attn_resolutions = {int(r) for r in attn_resolutions}
        factor = 2 ** (len(channel_mult) - 1)
        if resolution % factor:
            raise ValueError(
                f"UNet resolution {resolution} is not divisible by 2**(len(channel_mult)-1)={factor}; "
                f"use fewer levels in model.channel_mult or resize the data to a multiple of {factor}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.resolution = resolution
        self.num_classes = num_classes
        self.null_class = num_classes
        self.gradient_checkpointing = gradient_checkpointing
        self.downsample_factor = factor

        emb_dim = 4 * base_channels
        self.noise_embed = NoiseLevelEmbedding(base_channels, emb_dim)
        self.class_embed = ClassEmbedding(num_classes, emb_dim) if num_classes > 0 else None

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, self.mid, skip_chs = encoder_blocks(
            base_channels, channel_mult, num_res_blocks, attn_resolutions, dropout, num_heads, resample_with_conv, resolution
        )
        ch, res = skip_chs[-1], resolution // factor

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skip_chs.pop(), base_channels * mult, emb_dim, dropout))
                ch = base_channels * mult
                if res in attn_resolutions:
                    self.up.append(AttnBlock(ch, num_heads))
            if level != 0:
                self.up.append(Upsample(ch, resample_with_conv))
                res *= 2

        self.norm_out = group_norm(ch)
        self.conv_out = zero_(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    def _run(self, block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(
                f"UNet input size {tuple(x.shape[-2:])} must be divisible by {self.downsample_factor}"
            )
        emb = self.noise_embed(noise_labels.reshape(-1).expand(x.shape[0]))
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels, x.shape[0], x.device)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            if not isinstance(block, AttnBlock):
                skips.append(h)
            else:  # attention refines the output of the res block just before it
                skips[-1] = h
        for block in self.mid:
            h = self._run(block, h, emb)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
