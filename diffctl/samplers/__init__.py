"""Samplers: pure functions of a denoiser (with its SDE), a start noise and per-sample generators.

Each sampler is `fn(denoiser, x, steps, labels=None, generators=None, **options) -> x0` (float,
unclipped). Sample i draws all its noise from its own CPU generator seeded by (seed, i), so it is
the same image whatever the batch size, the number of devices or the device type.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from diffctl.errors import ConfigError
from diffctl.samplers.common import SPACINGS, Level, denoise, noise_levels, randn, randn_like, sample_generators, start
from diffctl.samplers.ode import SOLVERS, ode
from diffctl.samplers.stochastic import CORRECTORS, PREDICTORS, VARIANCES, ddim, ddpm, pc


@torch.inference_mode()
def consistency(denoiser, x: Tensor, steps: int, labels=None, generators=None, spacing: str = "karras") -> Tensor:
    """Consistency sampling (Song et al. 2023): one evaluation at T, then steps-1 rounds that re-noise
    the x0 estimate to a lower level and map it back to x0. The levels are those of steps+1 levels
    without the last, which would re-noise by almost nothing."""
    sde = denoiser.sde
    levels = [Level(sde, float(t)) for t in noise_levels(sde, steps + 1, spacing, t_end=sde.eps)[:-1]]
    s_min = Level(sde, sde.eps).s
    x0 = denoise(denoiser, start(x, sde, levels[0]), levels[0], labels).x0
    for level in levels[1:]:
        y = x0 + (level.s**2 - s_min**2) ** 0.5 * randn_like(x0, generators)
        x0 = denoise(denoiser, y, level, labels).x0
    return x0


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "pc": pc,
    "ode": ode,
    "consistency": consistency,
}

# Allowed values of the options that are not free numbers.
_CHOICES = {
    "spacing": SPACINGS,
    "solver": SOLVERS,
    "predictor": tuple(PREDICTORS),
    "corrector": tuple(CORRECTORS),
    "variance": VARIANCES,
}


def sampler_options(name: str) -> dict[str, Any]:
    """The options `name` accepts, with their defaults."""
    params = inspect.signature(SAMPLERS[name]).parameters
    return {k: p.default for k, p in list(params.items())[5:]}  # after (denoiser, x, steps, labels, generators)


def check_sampler(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Validate a sampler config {name, **options}; returns (name, options). ConfigError on bad input."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    allowed = sampler_options(name)
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ConfigError(f"sampler={name} has no option {', '.join(unknown)}; its options are: {', '.join(allowed) or 'none'}")
    for key, value in spec.items():
        choices = (*_CHOICES[key], "auto") if (name, key) == ("ode", "spacing") else _CHOICES.get(key)
        if choices and value not in choices:
            raise ConfigError(f"sampler.{key} must be one of {', '.join(choices)}, got {value!r}")
    if name == "pc" and spec.get("variance", "small") != "small" and spec.get("predictor", "reverse_diffusion") != "ancestral":
        raise ConfigError(f"sampler.variance={spec['variance']} is the ancestral predictor's; add sampler.predictor=ancestral")
    if not 0.0 <= float(spec.get("eta", 0.0)) <= 1.0:
        raise ConfigError(f"sampler.eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM), got {spec['eta']}")
    for key in ("snr", "rtol", "atol"):
        if key in spec and not float(spec[key]) > 0:
            raise ConfigError(f"sampler.{key} must be > 0, got {spec[key]}")
    if "lower_order_final" in spec and not isinstance(spec["lower_order_final"], bool):
        raise ConfigError(f"sampler.lower_order_final must be true or false, got {spec['lower_order_final']!r}")
    for key in ("sigma_min", "sigma_max"):
        if spec.get(key) is not None and not (isinstance(spec[key], (int, float)) and not isinstance(spec[key], bool) and spec[key] > 0):
            raise ConfigError(f"sampler.{key} must be a number > 0 (s = sigma/alpha) or null (the SDE's own end), got {spec[key]!r}")
    s_min, s_max = spec.get("sigma_min"), spec.get("sigma_max", allowed.get("sigma_max"))
    if s_min is not None and s_max is not None and not s_min < s_max:
        raise ConfigError(f"sampler.sigma_min must be below sampler.sigma_max, got {s_min} and {s_max}")
    if "corrector_steps" in spec and (not isinstance(spec["corrector_steps"], int) or spec["corrector_steps"] < 0):
        raise ConfigError(f"sampler.corrector_steps must be an integer >= 0, got {spec['corrector_steps']!r}")
    return name, spec


def sampler_spec(value: str | Mapping[str, Any]) -> dict[str, Any]:
    """A sampler given as a name (its default options) or as a mapping {name, **options}, as a dict."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    raise ConfigError(f"a sampler is a name or {{name: ..., <option>: ...}}, got {value!r}")


def generate(
    denoiser,
    num: int,
    shape: tuple[int, ...],
    sampler: str | Mapping[str, Any],
    steps: int,
    seed: int = 0,
    labels: Tensor | None = None,
    device=None,
    first_index: int = 0,
) -> Tensor:
    """Samples first_index .. first_index+num-1 of `shape` for `seed`. `sampler` is a name or a
    config {name, **options}."""
    name, options = check_sampler(sampler_spec(sampler))
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    generators = sample_generators(seed, range(first_index, first_index + num))
    x = denoiser.sde.prior_std() * randn(generators, shape, device=device)
    return SAMPLERS[name](denoiser, x, steps, labels=labels, generators=generators, **options)


__all__ = ["SAMPLERS", "check_sampler", "generate", "sampler_spec", "noise_levels", "sample_generators", "sampler_options"]
