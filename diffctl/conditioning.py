"""Conditioners: a batch (a dict) becomes the `cond` dict a model is called with, and the null
condition lives here and nowhere else.

`cond` is a plain dict of per-sample tensors keyed by condition name ("class_label" today; image
conditions later). Samplers pass it through untouched (k-diffusion's extra_args); only the
conditioner builds it, drops it (label dropout in training) and nulls it (classifier-free guidance).
An unconditional model's cond is {}.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

CLASS_LABEL = "class_label"  # the batch key of a dataset's labels and the cond key of class conditioning
IMAGE = "image"  # the batch key of the images a model learns


class Conditioner:
    """No condition: every cond is {}."""

    keys: frozenset[str] = frozenset()
    num_classes = 0
    dropout = 0.0  # probability a condition is replaced by the null one in training (trains the null condition)
    extra_channels = 0  # input channels it adds to the network's (image conditions, diffctl/image_conditions.py)

    def from_batch(self, batch: Mapping[str, Tensor], rng=None) -> dict[str, Tensor]:
        """The cond of a training batch; rng: the step's random draws (diffctl.rng.BatchRandom), for
        conditions made at random from the batch (inpainting masks)."""
        return {}

    def network_input(self, x: Tensor, cond: Mapping[str, Tensor] | None) -> Tensor:
        """What the backbone sees, from its scaled input x: x itself, or x with condition channels."""
        return x

    def null(self, cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {}

    def drop(self, cond: Mapping[str, Tensor], rng) -> dict[str, Tensor]:
        """Training-time condition dropout (nothing to drop)."""
        return dict(cond)

    def for_samples(self, first: int, n: int, device, class_label: int | None = None) -> dict[str, Tensor]:
        """The cond of samples first..first+n-1 of a sampling run."""
        return {}

    def concat(self, conds: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """One cond for a batch made by concatenating batches (guidance runs both halves at once)."""
        return {key: torch.cat([c[key] for c in conds]) for key in self.keys if all(key in c for c in conds)}


class ClassConditioner(Conditioner):
    """Class labels 0..K-1; label K is the null class (the networks' extra embedding row, the
    mixture's whole distribution), used for label dropout and classifier-free guidance."""

    keys = frozenset({CLASS_LABEL})

    def __init__(self, num_classes: int, dropout: float = 0.0):
        if num_classes < 1:
            raise ValueError(f"a class conditioner needs num_classes >= 1, got {num_classes}")
        self.num_classes, self.dropout = int(num_classes), float(dropout)

    def from_batch(self, batch, rng=None):
        return {CLASS_LABEL: batch[CLASS_LABEL]}

    def null(self, cond):
        return {CLASS_LABEL: torch.full_like(cond[CLASS_LABEL], self.num_classes)}

    def drop(self, cond, rng):
        """Each label becomes the null class with probability `dropout` (one uniform per sample of the
        global batch from the step's random draws, diffctl.rng.BatchRandom)."""
        y = cond[CLASS_LABEL]
        drop = rng.rand(y.shape) < self.dropout
        return {**cond, CLASS_LABEL: torch.where(drop, torch.full_like(y, self.num_classes), y)}

    def for_samples(self, first, n, device, class_label=None):
        """Sample i gets class_label, or class i mod K (balanced) when class_label is None."""
        if class_label is not None:
            return {CLASS_LABEL: torch.full((n,), int(class_label), device=device)}
        return {CLASS_LABEL: torch.arange(first, first + n, device=device) % self.num_classes}


def class_labels(cond: Mapping[str, Tensor] | None) -> Tensor | None:
    """The class labels a cond carries (None: none)."""
    return None if not cond else cond.get(CLASS_LABEL)


def make_conditioner(num_classes: int, dropout: float = 0.0) -> Conditioner:
    return ClassConditioner(num_classes, dropout) if num_classes > 0 else Conditioner()
