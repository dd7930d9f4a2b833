"""Diffusion Transformer (Peebles & Xie 2023) with adaLN-Zero conditioning."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffctl.networks.embeddings import ClassEmbedding, NoiseLevelEmbedding, sincos_pos_embed_2d

# Paper configurations: (hidden_size, depth, num_heads).
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        # adaLN-Zero: the modulation starts at zero, so gates are 0 and each block is the identity.
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None, :] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2[:, None, :] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Patch-based transformer denoiser; `forward(x, noise_labels, class_labels=None)`.

    `size` in {"S", "B", "L", "XL"} selects the paper's width/depth/heads and overrides
    hidden_size, depth and num_heads.
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        out_channels: Optional[int] = None,
        size: Optional[str] = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if size is not None:
            key = str(size).upper()
            if key not in DIT_SIZES:
                raise ValueError(f"DiT size must be one of {sorted(DIT_SIZES)} (or null), got {size!r}")
            hidden_size, depth, num_heads = DIT_SIZES[key]
        if resolution % patch_size:
            raise ValueError(
                f"DiT resolution {resolution} is not divisible by patch_size {patch_size}; "
                f"pick a patch_size that divides {resolution} or resize the data"
            )
        if hidden_size % num_heads:
            raise ValueError(f"DiT num_heads={num_heads} must divide hidden_size={hidden_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.resolution = resolution
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.null_class = num_classes
        self.gradient_checkpointing = gradient_checkpointing
        self.grid = resolution // patch_size

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # Fixed positional table: a buffer, so it is neither trained nor counted as a parameter.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.noise_embed = NoiseLevelEmbedding(256, hidden_size)
        self.class_embed = ClassEmbedding(num_classes, hidden_size) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Recipe from the paper: xavier linears, small-normal embeddings, zero adaLN and output.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.noise_embed.mlp[0], self.noise_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.table.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for layer in (self.final.ada[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        b, _, h, w = x.shape
        if h != self.resolution or w != self.resolution:
            raise ValueError(
                f"DiT was built for {self.resolution}x{self.resolution} inputs (fixed positional table), got {h}x{w}"
            )
        c = self.noise_embed(noise_labels.reshape(-1).expand(b))
        if self.class_embed is not None:
            c = c + self.class_embed(class_labels, b, x.device)

        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        out = self.final(tokens, c)  # [B, T, p*p*C]

        # Unpatchify: token (i, j) holds a p x p x C patch in (p, p, C) order.
        p, g = self.patch_size, self.grid
        out = out.reshape(b, g, g, p, p, self.out_channels)
        return torch.einsum("bijpqc->bcipjq", out).reshape(b, self.out_channels, g * p, g * p)
