"""Samplers: pure functions of a model (with its SDE), a start noise and a per-sample noise source.

Each sampler is `fn(model, x, steps, cond=None, noise=None, **options) -> x0` (float,
unclipped). `noise` (diffctl.noise.SampleNoise) gives draw k of sample i as a function of
(seed, i, k) alone, computed on the batch's device, so sample i is the same image whatever the batch
size or the number of devices (and, up to the last bit of log/cos/sin, the device type).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from diffctl.errors import ConfigError, DiffctlError
from diffctl.schema import check_sampler_node, choices
from diffctl.schema.choices import OPTION_RULES, SAMPLER_NODE, option_rules
from diffctl.noise import NOISE_VERSION, sample_noise
from diffctl.samplers.common import SPACINGS, Level, denoise, noise_levels, sample_generators, start
from diffctl.samplers.ode import SOLVERS, ode
from diffctl.samplers.stochastic import CORRECTORS, PREDICTORS, VARIANCES, ddim, ddpm, pc


class NonFiniteSamples(DiffctlError):
    """A sampler returned NaN or infinite values (a diverging sampler, extreme guidance, NaN weights)."""


@torch.inference_mode()
def consistency(model, x: Tensor, steps: int, cond=None, noise=None, spacing: str = "karras") -> Tensor:
    """Consistency sampling (Song et al. 2023): one evaluation at T, then steps-1 rounds that re-noise
    the x0 estimate to a lower level and map it back to x0. The levels are those of steps+1 levels
    without the last, which would re-noise by almost nothing."""
    sde = model.sde
    levels = [Level(sde, float(t)) for t in noise_levels(sde, steps + 1, spacing, t_end=sde.eps)[:-1]]
    s_min = Level(sde, sde.eps).s
    x0 = denoise(model, start(x, sde, levels[0]), levels[0], cond).x0
    for level in levels[1:]:
        y = x0 + (level.s**2 - s_min**2) ** 0.5 * noise.randn_like(x0)
        x0 = denoise(model, y, level, cond).x0
    return x0


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "pc": pc,
    "ode": ode,
    "consistency": consistency,
}


def sampler_options(name: str) -> dict[str, Any]:
    """The options `name` accepts, with their defaults."""
    params = inspect.signature(SAMPLERS[name]).parameters
    return {k: p.default for k, p in list(params.items())[5:]}  # after (model, x, steps, cond, noise)


def undeclared() -> list[str]:
    """Where the names the schema checks configs with (diffctl/schema/choices.py, declared there so a
    config is checked before torch is imported) differ from the samplers' own ([]: nowhere)."""
    ours = {"samplers": tuple(SAMPLERS), "spacings": SPACINGS, "solvers": SOLVERS, "predictors": tuple(PREDICTORS),
            "correctors": tuple(CORRECTORS), "variances": VARIANCES,
            **{f"{name} options": tuple(sampler_options(name)) for name in SAMPLERS}}  # fmt: skip
    declared = {"samplers": tuple(choices.SAMPLER_OPTIONS), "spacings": choices.SPACINGS, "solvers": choices.SOLVERS,
                "predictors": choices.PREDICTORS, "correctors": choices.CORRECTORS, "variances": choices.VARIANCES,
                **{f"{name} options": choices.SAMPLER_OPTIONS.get(name) for name in SAMPLERS}}  # fmt: skip
    return [f"{key}: {ours[key]} here, {declared[key]} there" for key in ours if ours[key] != declared[key]]


def check_sampler(spec: Mapping[str, Any], key: str = "sampler") -> tuple[str, dict[str, Any]]:
    """Validate a sampler config {name, **options}; returns (name, options). ConfigError on bad input:
    the option rules (diffctl/schema/choices.py), then the combinations they cannot express."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    check_sampler_node({"name": name, **spec}, SAMPLER_NODE, key, "sample")
    if name == "pc" and spec.get("variance", "small") != "small" and spec.get("predictor", "reverse_diffusion") != "ancestral":
        raise ConfigError(f"{key}.variance={spec['variance']} is the ancestral predictor's; add {key}.predictor=ancestral")
    s_min, s_max = spec.get("sigma_min"), spec.get("sigma_max", sampler_options(name).get("sigma_max"))
    if s_min is not None and s_max is not None and not s_min < s_max:
        raise ConfigError(f"{key}.sigma_min must be below {key}.sigma_max, got {s_min} and {s_max}")
    return name, spec


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
    x0 = SAMPLERS[name](model, x, steps, cond=cond, noise=noise, **options)
    bad = ~torch.isfinite(x0.reshape(num, -1)).all(1)
    if bad.any():  # uint8 images cannot hold NaN: written, they would look like real samples
        raise NonFiniteSamples(
            f"sampler={name} produced non-finite values (nan/inf) in {int(bad.sum())} of {num} samples "
            f"(the first is sample {first_index + int(bad.nonzero()[0])}); nothing of them was written. Lower guidance, "
            "set clip_denoised=true, use more steps or another sampler, or check the weights"
        )
    return x0


__all__ = ["NonFiniteSamples", "OPTION_RULES", "SAMPLER_NODE", "SAMPLERS", "option_rules", "check_sampler", "generate", "sampler_spec", "noise_levels", "sample_generators", "sampler_options", "undeclared"]
