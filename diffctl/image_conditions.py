"""Image conditions for image-to-image diffusion (the notes' §5.3.2, eq. 5.10): the network sees a
source image y beside the noisy target x_t, eps_theta(x_t, y, t), trained like DDPM. The source is
made from each training image on the fly and concatenated to the network input as extra channels
(as SR3, Saharia et al. 2021, and Palette, Saharia et al. 2022); it is not scaled by c_in.

- SuperResolution (`condition=sr`): y = the image downsampled by `factor` and upsampled back to full
  size, both with `filter` (bicubic with antialiasing by default, PIL's and SR3's degradation; or
  area = box averaging), clipped to [-1, 1]. C extra channels.
- Colorization (`condition=colorize`): y = the luma of an RGB image (ITU-R BT.601, 0.299 R +
  0.587 G + 0.114 B, PIL's convert("L")); the weights sum to 1, so [-1, 1] stays [-1, 1]. 1 channel.
- Inpainting (`condition=inpaint`): y = the image with its unknown pixels set to 0, plus the mask
  (1 = known, as diffctl/masks.py). Masks are Palette-like (a box joined with brush strokes,
  diffctl.masks.random_mask), one per sample keyed by the step's random draws, so a resumed or
  multi-process run draws the same ones. C + 1 channels.

The null condition (condition dropout, for classifier-free guidance on the source) is an all-zero
source; `dropout` is its probability in training, one draw per sample of the global batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffctl.conditioning import IMAGE, Conditioner
from diffctl.errors import ConfigError

SOURCE = "source"  # the cond key of the source image: [B, extra_channels, H, W]
FILTERS = ("bicubic", "area")
LUMA = (0.299, 0.587, 0.114)


class ImageConditioner(Conditioner, ABC):
    """A source image made from the target image; the model concatenates it to its network input."""

    keys = frozenset({SOURCE})
    name = "image"

    def __init__(self, channels: int, resolution: int, dropout: float = 0.0):
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"condition.dropout must be in [0, 1) (1 would never show the source), got {dropout}")
        self.channels, self.resolution, self.dropout = int(channels), int(resolution), float(dropout)

    @property
    @abstractmethod
    def extra_channels(self) -> int: ...

    @abstractmethod
    def source(self, x0: Tensor, rng) -> Tensor:
        """The source image [B, extra_channels, H, W] of target images x0 [B, C, H, W] in [-1, 1]."""

    def shown(self, cond: Mapping[str, Tensor]) -> Tensor:
        """The source as an image with the data's channels, for grids."""
        return cond[SOURCE]

    def sources(self, x0: Tensor, first: int, seed: int) -> Tensor:
        """The sources of targets x0 [n, C, H, W], images first..first+n-1 of a sampling run
        (`diffctl sample source=`): any random part of image i from (seed, i) alone, so that every
        batching and number of processes gives the same sources. Deterministic conditions: source()."""
        return self.source(x0, None)

    def given_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of images that are sources themselves (not targets to make them from); None: none are."""
        return None

    def from_given(self, images: Tensor) -> Tensor:
        """cond[SOURCE] of images of given_shape() that are sources themselves."""
        raise ValueError(f"a {self.name} model takes no source images, only targets")

    def given(self, x0: Tensor) -> Tensor | None:
        """The images of given_shape() that targets x0 degrade to (sr: the low-resolution ones);
        None where no such images exist."""
        return None

    def consistency(self, outputs: Tensor, given: Tensor) -> float | None:
        """How far outputs are from explaining their given sources (SR3's consistency error for sr);
        None where the condition defines none."""
        return None

    def preview(self, x0: Tensor, seed: int) -> dict[str, Tensor]:
        """The cond of target images x0 outside training (sample grids): random parts from `seed`."""
        from diffctl.rng import BatchRandom

        return self.from_batch({IMAGE: x0}, BatchRandom(seed, 0, 0, 0, 1, x0.shape[0], x0.device))

    def from_batch(self, batch: Mapping[str, Tensor], rng=None) -> dict[str, Tensor]:
        return {SOURCE: self.source(batch[IMAGE], rng)}

    def null(self, cond):
        return {SOURCE: torch.zeros_like(cond[SOURCE])}

    def drop(self, cond, rng):
        if self.dropout == 0:
            return dict(cond)
        y = cond[SOURCE]
        keep = (rng.rand((y.shape[0],)) >= self.dropout).to(y.dtype).view(-1, 1, 1, 1)
        return {**cond, SOURCE: y * keep}

    def network_input(self, x: Tensor, cond: Mapping[str, Tensor] | None) -> Tensor:
        if not cond or SOURCE not in cond:
            raise ValueError(f"a {self.name} model needs cond['{SOURCE}'], its source image")
        return torch.cat([x, cond[SOURCE].to(x.dtype)], 1)

    def for_samples(self, first, n, device, class_label=None):
        raise ConfigError(f"this model is conditioned on {self.name} source images: it samples from sources only, not from noise alone")


class SuperResolution(ImageConditioner):
    name = "sr"

    def __init__(self, channels: int, resolution: int, factor: int = 2, filter: str = "bicubic", dropout: float = 0.0):
        super().__init__(channels, resolution, dropout)
        if filter not in FILTERS:
            raise ValueError(f"condition.filter must be one of {', '.join(FILTERS)}, got {filter!r}")
        if int(factor) < 2 or resolution % int(factor):
            raise ValueError(f"condition.factor must be an integer >= 2 dividing the resolution {resolution}, got {factor}")
        self.factor, self.filter = int(factor), filter

    @property
    def extra_channels(self) -> int:
        return self.channels

    def downsample(self, x: Tensor) -> Tensor:
        """The low-resolution image [B, C, H/f, W/f] (the source SR3 is given, before upsampling)."""
        size = (x.shape[-2] // self.factor, x.shape[-1] // self.factor)
        if self.filter == "area":
            return F.avg_pool2d(x, self.factor)
        return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)

    def upsample(self, low: Tensor) -> Tensor:
        size = (low.shape[-2] * self.factor, low.shape[-1] * self.factor)
        if self.filter == "area":
            return F.interpolate(low, size=size, mode="nearest")
        return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)

    def source(self, x0, rng):
        return self.upsample(self.downsample(x0))

    def given_shape(self):
        low = self.resolution // self.factor
        return (self.channels, low, low)

    def from_given(self, images):  # low-resolution images, upsampled as in training
        return self.upsample(images)

    def given(self, x0):
        return self.downsample(x0)

    def consistency(self, outputs, given):
        """Mean |downsample(output) - low| over pixels and images, with the model's own downsampling."""
        return float((self.downsample(outputs) - given).abs().mean())


class Colorization(ImageConditioner):
    name = "colorize"

    def __init__(self, channels: int, resolution: int, dropout: float = 0.0):
        super().__init__(channels, resolution, dropout)
        if channels != 3:
            raise ValueError(f"condition=colorize needs RGB data (3 channels), the data has {channels}")

    @property
    def extra_channels(self) -> int:
        return 1

    def source(self, x0, rng):
        w = torch.tensor(LUMA, dtype=x0.dtype, device=x0.device).view(1, 3, 1, 1)
        return (x0 * w).sum(1, keepdim=True)

    def given_shape(self):
        return (1, self.resolution, self.resolution)

    def from_given(self, images):  # gray images are the luma already
        return images

    def shown(self, cond):
        return cond[SOURCE].expand(-1, 3, -1, -1)


class Inpainting(ImageConditioner):
    name = "inpaint"

    @property
    def extra_channels(self) -> int:
        return self.channels + 1

    def masks(self, n: int, rng) -> Tensor:
        """n Palette-like masks [n, 1, H, W] (1 = known), sample j's from the step's draw j."""
        from diffctl.masks import random_mask

        if rng is None:
            raise ValueError("inpainting masks are drawn from the step's random draws (rng)")
        seeds = rng.randint(2**31 - 1, (n,)).tolist()
        r = self.resolution
        return torch.from_numpy(np.stack([random_mask(r, r, s, 0) for s in seeds])[:, None].astype(np.float32))

    def source(self, x0, rng):
        known = self.masks(x0.shape[0], rng).to(device=x0.device, dtype=x0.dtype)
        return self.masked(x0, known)

    @staticmethod
    def masked(x0: Tensor, known: Tensor) -> Tensor:
        return torch.cat([x0 * known, known], 1)

    def sources(self, x0, first, seed):
        """Image i's mask is diffctl.masks.random_mask(H, W, seed, i), `diffctl inpaint mask=random`'s."""
        from diffctl.masks import random_mask

        h, w = x0.shape[-2:]
        known = np.stack([random_mask(h, w, seed, first + j) for j in range(x0.shape[0])])[:, None]
        return self.masked(x0, torch.from_numpy(known.astype(np.float32)).to(device=x0.device, dtype=x0.dtype))

    def shown(self, cond):
        image, known = cond[SOURCE][:, :-1], cond[SOURCE][:, -1:]
        return image * known - (1 - known)  # the hole black


def triplets(source: Tensor, output: Tensor, target: Tensor | None) -> Tensor:
    """[3N, C, H, W]: source, output, target of each image in turn (a grid with a multiple of 3 per
    row); without targets [2N, C, H, W]: source, output."""
    parts = [source.to(output), output] + ([] if target is None else [target.to(output)])
    return torch.stack(parts, 1).flatten(0, 1)


def refuse_source_models(can, description: str, command: str) -> None:
    """ConfigError if a model needs source images (an image-to-image model), for commands that make
    images from noise alone (can: its Capabilities)."""
    if SOURCE in can.conditions:
        raise ConfigError(f"{description} is an image-to-image model (it is conditioned on source images); "
                          f"`diffctl {command}` makes images from noise alone and cannot run it")  # fmt: skip


CONDITIONS = {"sr": SuperResolution, "colorize": Colorization, "inpaint": Inpainting}
