"""The first stage as latent diffusion uses it: images <-> the latents the diffusion model works on.

A diffusion model trained with `first_stage=` models u = (z - shift) * scale, z ~ q(z | x) of a frozen
autoencoder (LDM, Rombach et al. 2022: scale = 1 / std(z) over the training set, shift 0; SD3 adds a
shift). Every SDE, objective and sampler acts on u unchanged; images are decode(u / scale + shift).

In a diffusion checkpoint the codec is stored once: the autoencoder's tensors under `first_stage.autoencoder.*`
of the state dict (the Lightning module holds it apart from the denoiser, so EMA and the optimizer never
see it), its diffusers config under checkpoint["diffctl"]["first_stage"], scale and shift in the run
config (`latent.scale`, `latent.shift`) — so sampling needs the checkpoint alone, not the folder it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from diffctl.errors import CheckpointError, ConfigError
from diffctl.first_stage import autoencoder_from_config, diffusers_config
from diffctl.networks.autoencoder import AutoencoderKL

STATE_PREFIX = "first_stage.autoencoder."  # the codec's tensors in a diffusion checkpoint's state dict


class LatentCodec(nn.Module):
    """A frozen AutoencoderKL with the latent scale and shift of the diffusion model trained on it."""

    def __init__(self, autoencoder: AutoencoderKL, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.scale, self.shift = float(scale), float(shift)

    def train(self, mode: bool = True) -> "LatentCodec":  # a frozen first stage stays in eval mode
        return super().train(False)

    @property
    def factor(self) -> int:
        return self.autoencoder.factor

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape(*image_shape)

    def image_shape(self, latent_shape) -> tuple[int, int, int]:
        """The decoded images' [C, H, W] of latents [Cz, h, w]."""
        _, h, w = latent_shape
        return (int(self.autoencoder.config["out_channels"]), int(h) * self.factor, int(w) * self.factor)

    @torch.no_grad()
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) [B, Cz, h, w] of q(z | x) for images x in [-1, 1] (what the latent cache stores)."""
        q = self.autoencoder.encode(x.to(self.device_dtype()[0]))
        return q.mean, q.std

    @torch.no_grad()
    def decode(self, u: Tensor, batch_size: int | None = None, progress: Callable[[int], None] | None = None) -> Tensor:
        """Images [B, C, H, W] (float32, the autoencoder's range, unclipped) of diffusion latents u, in
        batches of `batch_size` (None: all at once); `progress(n)` after each with the images done."""
        dev, dtype = self.device_dtype()
        step = batch_size or max(len(u), 1)
        out = []
        for start in range(0, len(u), step):
            z = u[start:start + step].to(dev, dtype) / self.scale + self.shift
            out.append(self.autoencoder.decode(z).float())
            if progress is not None:
                progress(min(start + step, len(u)))
        return torch.cat(out) if out else u.new_zeros((0, *self.image_shape(u.shape[1:])))

    def device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.autoencoder.parameters())
        return p.device, p.dtype

    def stored(self) -> dict[str, Any]:
        """What a diffusion checkpoint keeps of the codec besides its tensors."""
        return {"config": diffusers_config(self.autoencoder)}


def codec_from_checkpoint(ckpt: dict[str, Any], config: dict[str, Any], path) -> LatentCodec | None:
    """The codec stored in a diffusion checkpoint (None for a pixel-space model); CheckpointError if a
    latent model's checkpoint lacks its first stage or its tensors do not fit."""
    config = config or {}
    latent = config.get("latent") or {}
    if not config.get("first_stage"):
        return None
    stored = (ckpt.get("diffctl") or {}).get("first_stage")
    state = {k[len(STATE_PREFIX):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(STATE_PREFIX)}
    if not isinstance(stored, dict) or not state:
        raise CheckpointError(f"{path} is a latent diffusion checkpoint without its first stage (no autoencoder tensors or config); "
                              "use the checkpoint as `diffctl train` wrote it")  # fmt: skip
    try:
        autoencoder = autoencoder_from_config(stored.get("config"), f"the first stage stored in {path}")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    from diffctl.build import state_mismatch

    mismatch = state_mismatch(autoencoder.state_dict(), state, "the checkpoint", "its stored autoencoder config")
    if mismatch is not None:
        raise CheckpointError(f"the first stage stored in {path} does not fit its config: {mismatch}")
    autoencoder.load_state_dict(state)
    scale, shift = latent.get("scale"), latent.get("shift")
    if scale is None or shift is None:
        raise CheckpointError(f"{path}: the run config has no latent.scale/latent.shift; use the checkpoint as `diffctl train` wrote it")
    return LatentCodec(autoencoder, float(scale), float(shift))
