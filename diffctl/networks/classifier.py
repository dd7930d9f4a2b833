"""Noise-conditional image classifier: the U-Net's encoder half with a pooled head, as ADM's classifier
(Dhariwal & Nichol 2021, guided_diffusion/unet.py EncoderUNetModel) for classifier guidance."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffctl.networks.embeddings import NoiseLevelEmbedding
from diffctl.networks.unet import encoder_blocks, group_norm, zero_

POOLS = ("adaptive", "attention")


class AttentionPool2d(nn.Module):
    """CLIP's / ADM's attention pooling: the mean feature, prepended to the flattened map as a query
    token, attends over every position (learned positional embedding); its output is projected to
    `out_dim`."""

    def __init__(self, size: int, channels: int, num_heads: int, out_dim: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"model.num_heads={num_heads} must divide the pooled width {channels}")
        self.num_heads = num_heads
        self.positional = nn.Parameter(torch.randn(size * size + 1, channels) / channels**0.5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + self.positional.to(x.dtype)
        q, k, v = self.qkv(tokens).reshape(b, -1, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # only the pooled token's output is used
        return self.proj(out.transpose(1, 2).reshape(b, c))


class EncoderClassifier(nn.Module):
    """`forward(x, noise_labels) -> logits [B, num_classes]`.

    conv_in, the U-Net's down path and middle (res-attn-res) with the same blocks and noise
    embedding (diffctl.networks.unet.encoder_blocks), then ADM's head: GroupNorm, SiLU and either
    global average pooling with a zero-initialised 1x1 projection (pool=adaptive; the classifier
    starts at the uniform distribution) or attention pooling (pool=attention)."""

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        num_classes: int,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        num_heads: int = 1,
        pool: str = "adaptive",
        resample_with_conv: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)  # Hydra hands over ListConfig
        factor = 2 ** (len(channel_mult) - 1)
        if resolution % factor:
            raise ValueError(
                f"classifier resolution {resolution} is not divisible by 2**(len(channel_mult)-1)={factor}; "
                f"use fewer levels in model.channel_mult"
            )
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")
        if pool not in POOLS:
            raise ValueError(f"model.pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.in_channels, self.resolution, self.num_classes = in_channels, resolution, num_classes
        self.gradient_checkpointing = gradient_checkpointing
        self.noise_embed = NoiseLevelEmbedding(base_channels, 4 * base_channels)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, self.mid, skip_chs = encoder_blocks(
            base_channels, channel_mult, num_res_blocks, {int(r) for r in attn_resolutions}, dropout, num_heads,
            resample_with_conv, resolution,
        )  # fmt: skip
        ch = skip_chs[-1]
        self.norm_out = group_norm(ch)
        if pool == "adaptive":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), zero_(nn.Linear(ch, num_classes)))
        else:
            self.head = AttentionPool2d(resolution // factor, ch, num_heads, num_classes)

    def forward(self, x: Tensor, noise_labels: Tensor) -> Tensor:
        emb = self.noise_embed(noise_labels.reshape(-1).expand(x.shape[0]))
        h = self.conv_in(x)
        for block in (*self.down, *self.mid):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, emb, use_reentrant=False)
            else:
                h = block(h, emb)
        return self.head(F.silu(self.norm_out(h)))
