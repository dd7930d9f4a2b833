"""Samplers: pure functions of a model (with its SDE), a start noise and a per-sample noise source.

Each sampler is `fn(model, x, steps, cond=None, noise=None, *, **options) -> x0` (float,
unclipped), one module of this package each, registered there with its option schema
(diffctl/samplers/registry.py); importing this package imports them all. `cond` goes to the model
untouched. `noise` (diffctl.noise.SampleNoise) gives draw k of sample i as a function of
(seed, i, k) alone, computed on the batch's device, so sample i is the same image whatever the batch
size or the number of devices (and, up to the last bit of log/cos/sin, the device type).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffctl.errors import ConfigError, DiffctlError
from diffctl.noise import NOISE_VERSION, sample_noise
from diffctl.noise import sample_generators
from diffctl.samplers.common import noise_levels
from diffctl.samplers.registry import SAMPLERS, check_fits, check_sampler, discover, register_sampler

discover(__name__, __path__)  # every sampler module registers itself: a new sampler is a new file

# The built-in samplers by name, for code that calls one directly (tests, scripts/bench_*.py).
from diffctl.samplers.consistency import consistency  # noqa: E402
from diffctl.samplers.ddim import ddim  # noqa: E402
from diffctl.samplers.ddpm import ddpm  # noqa: E402
from diffctl.samplers.edm import edm  # noqa: E402
from diffctl.samplers.kdiffusion import dpmpp_2m_sde, dpmpp_3m_sde, euler_ancestral  # noqa: E402
from diffctl.samplers.ode import ode  # noqa: E402
from diffctl.samplers.pc import pc  # noqa: E402


class NonFiniteSamples(DiffctlError):
    """A sampler returned NaN or infinite values (a diverging sampler, extreme guidance, NaN weights)."""


def sampler_options(name: str) -> dict[str, Any]:
    """The options `name` accepts, with their defaults."""
    return dict(SAMPLERS[name].defaults)


def sampler_spec(value: str | Mapping[str, Any]) -> dict[str, Any]:
    """A sampler given as a name (its default options) or as a mapping {name, **options}, as a dict."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    raise ConfigError(f"a sampler is a name or {{name: ..., <option>: ...}}, got {value!r}")


def generate(
    model,
    num: int,
    shape: tuple[int, ...],
    sampler: str | Mapping[str, Any],
    steps: int,
    seed: int = 0,
    cond: dict | None = None,
    device=None,
    first_index: int = 0,
    noise_version: int = NOISE_VERSION,
) -> Tensor:
    """Samples first_index .. first_index+num-1 of `shape` for `seed`. `sampler` is a name or a
    config {name, **options}. noise_version: diffctl.noise.NOISE_VERSIONS (1: a run made before
    counter-based noise, resumed with its own)."""
    name, options = check_sampler(sampler_spec(sampler))
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    noise = sample_noise(seed, range(first_index, first_index + num), device, noise_version)
    x = model.sde.prior_std() * noise.randn(shape, device=device)  # draw 0: the start noise
    x0 = SAMPLERS[name].fn(model, x, steps, cond=cond, noise=noise, **options)
    bad = ~torch.isfinite(x0.reshape(num, -1)).all(1)
    if bad.any():  # uint8 images cannot hold NaN: written, they would look like real samples
        raise NonFiniteSamples(
            f"sampler={name} produced non-finite values (nan/inf) in {int(bad.sum())} of {num} samples "
            f"(the first is sample {first_index + int(bad.nonzero()[0])}); nothing of them was written. Lower guidance, "
            "set clip_denoised=true, use more steps or another sampler, or check the weights"
        )
    return x0


__all__ = ["NonFiniteSamples", "SAMPLERS", "check_fits", "check_sampler", "consistency", "ddim", "ddpm", "dpmpp_2m_sde", "dpmpp_3m_sde",
           "edm", "euler_ancestral", "generate", "noise_levels", "ode", "pc", "register_sampler", "sample_generators", "sampler_options", "sampler_spec"]  # fmt: skip
