"""Conditioning pieces shared by the U-Net and the DiT."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


def sinusoidal_embedding(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sin/cos features of a (possibly non-integer) scalar per sample.

    Frequencies are geometric from 1 down to 1/max_period, so inputs in roughly
    [0, 1000] are resolved both coarsely and finely. Returns [B, dim].
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )
    args = values.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:  # keep the requested width for odd dims
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class NoiseLevelEmbedding(nn.Module):
    """Sinusoidal features followed by Linear-SiLU-Linear, as in DDPM/DiT."""

    def __init__(self, freq_dim: int, out_dim: int, hidden_dim: Optional[int] = None):
        super().__init__()
        self.freq_dim = freq_dim
        hidden_dim = hidden_dim or out_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, noise_labels: Tensor) -> Tensor:
        emb = sinusoidal_embedding(noise_labels, self.freq_dim)
        # Match the MLP dtype so autocast/bf16 weights work.
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ClassEmbedding(nn.Module):
    """Class table with one extra "null" row (index num_classes) for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.null_class = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, class_labels: Optional[Tensor], batch_size: int, device: torch.device) -> Tensor:
        if class_labels is None:  # no labels means unconditional, i.e. the null class
            class_labels = torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        return self.table(class_labels.long())


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2D sin-cos position table [grid_size**2, dim], row-major over (row, col).

    Half of the channels encode the row index and half the column index (MAE/DiT recipe).
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos positional embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)

    def encode(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1)
