"""The sampler registry: each sampler declares itself, with its option schema, where it is defined.

    @register_sampler("ddim", eta=Float(ge=0, le=1), spacing=Choice(*SPACINGS))
    def ddim(model, x, steps, cond=None, noise=None, *, eta=0.0, spacing="trailing"): ...

A sampler is a pure function of (model, x, steps, cond, noise, options): `cond` goes to the model
untouched (k-diffusion's extra_args), `noise` is the per-sample noise source (diffctl.noise). Its
options are its keyword-only parameters; their defaults are the signature's (one source: the functions
stay callable on their own, and conf/sampler/<name>.yaml must repeat them, which a test checks), their
rules the declaration's. Registration refuses a function whose options and declared rules differ, so
the two cannot drift. Everything that checks a sampler config (check_sampler, the config schema's
sampler.* and sample_grid.sampler.* nodes) reads this registry.

Adding a sampler is one file in diffctl/samplers/ (imported by `discover`, from diffctl/samplers/__init__.py)
plus conf/sampler/<name>.yaml. The sampler modules import torch, so the CLI's torch-free first check
leaves sampler nodes to the command unless the command line sets one (diffctl/cli.py).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from diffctl.errors import ConfigError
from diffctl.schema.nodes import check_node, fail
from diffctl.schema.rules import Choice, Rule

CONTRACT = ("model", "x", "steps", "cond", "noise")  # every sampler's leading parameters, in this order
NOT_SAMPLERS = frozenset({"common", "registry"})  # modules of diffctl/samplers/ that define none

# What a sampler may need of the model: a field of diffctl.denoiser.Capabilities that must be true,
# and how the refusal names it.
NEEDS = {
    "pf_ode": "a diffusion model, which has a score at every noise level (not a consistency model)",
    "one_step": "a consistency model (a one-step model)",
}

# A cross-option rule: (options with defaults filled in, the config key) -> message, or None when fine.
Check = Callable[[dict, str], "str | None"]


@dataclass(frozen=True)
class Sampler:
    name: str
    fn: Callable
    rules: dict[str, Rule]  # option -> rule, in the function's order
    defaults: dict[str, Any]  # option -> default (the signature's)
    checks: tuple[Check, ...]  # rules between options
    needs: str  # the Capabilities field the model must have (NEEDS)


SAMPLERS: dict[str, Sampler] = {}  # name -> sampler, filled as the sampler modules are imported


def register_sampler(name: str, *, needs: str = "pf_ode", checks: tuple[Check, ...] = (), **rules: Rule):
    """Decorator: register `fn` as sampler `name` with one rule per option (keyword-only parameter).
    TypeError (a programming error, at import) when the signature breaks the contract."""

    def register(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters.values()
        leading = tuple(p.name for p in params if p.kind is not p.KEYWORD_ONLY)
        options = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        if leading != CONTRACT:
            raise TypeError(f"sampler {name}: parameters before the options must be {CONTRACT}, got {leading}")
        if set(options) != set(rules) or inspect.Parameter.empty in options.values():
            raise TypeError(f"sampler {name}: options (keyword-only, with defaults) {tuple(options)} differ from its rules {tuple(rules)}")
        if needs not in NEEDS:
            raise TypeError(f"sampler {name}: needs={needs!r} is none of {', '.join(NEEDS)}")
        old = SAMPLERS.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise TypeError(f"sampler {name} is registered twice: {old.fn.__module__} and {fn.__module__}")
        SAMPLERS[name] = Sampler(name, fn, {k: rules[k] for k in options}, options, tuple(checks), needs)
        return fn

    return register


def discover(package: str, path) -> None:
    """Import every module of a package (its __path__), so that each registers its samplers."""
    for module in pkgutil.iter_modules(path):
        if module.name not in NOT_SAMPLERS and not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")


def names() -> tuple[str, ...]:
    return tuple(sorted(SAMPLERS))  # the order of conf/sampler/ and `diffctl --help`


# ---------------------------------------------------------------- cross-option rules


def only_with(option: str, default, other: str, value) -> Check:
    """`option` other than its default needs `other`=value."""

    def check(options: dict, key: str) -> str | None:
        if options[option] != default and options[other] != value:
            return f"{key}.{option}={options[option]} is the {value} {other}'s; add {key}.{other}={value}"
        return None

    return check


def below(lower: str, upper: str) -> Check:
    """`lower` < `upper` where both are set (null: the other end is the SDE's own)."""

    def check(options: dict, key: str) -> str | None:
        lo, hi = options[lower], options[upper]
        if lo is not None and hi is not None and not lo < hi:
            return f"{key}.{lower} must be below {key}.{upper}, got {lo} and {hi}"
        return None

    return check


def not_above(lower: str, upper: str) -> Check:
    """`lower` <= `upper` where both are set (null: no bound)."""

    def check(options: dict, key: str) -> str | None:
        lo, hi = options[lower], options[upper]
        if lo is not None and hi is not None and lo > hi:
            return f"{key}.{lower} must not exceed {key}.{upper}, got {lo} and {hi}"
        return None

    return check


def only_for_spacings(option: str, spacings: tuple[str, ...]) -> Check:
    """`option` set (not null) needs one of `spacings`."""

    def check(options: dict, key: str) -> str | None:
        if options[option] is not None and options["spacing"] not in spacings:
            return f"{key}.{option} needs {key}.spacing={' or '.join(spacings)} (it moves an end of those levels), got {options['spacing']}"
        return None

    return check


# ---------------------------------------------------------------- checking a config


def check_options(name: str, options: Mapping[str, Any], key: str) -> None:
    """The options given for sampler `name` (a registered one): known, each within its rule, and
    the rules between them. ConfigError naming `key`.<option>."""
    sampler = SAMPLERS[name]
    unknown = sorted(set(options) - set(sampler.rules))
    if unknown:
        raise ConfigError(f"{key}={name} has no option {', '.join(unknown)}; its options are: {', '.join(sampler.rules) or 'none'}")
    for option, value in options.items():
        check_node(value, sampler.rules[option], f"{key}.{option}", "sample")
    full = {**sampler.defaults, **options}
    for check in sampler.checks:
        message = check(full, key)
        if message is not None:
            raise ConfigError(message)


def check_sampler(spec: Mapping[str, Any], key: str = "sampler") -> tuple[str, dict[str, Any]]:
    """Validate a sampler config {name, **options}; returns (name, options)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(names())}")
    check_options(name, spec, key)
    return name, spec


def check_config_node(data, key: str) -> None:
    """The config schema's check of a sampler node (diffctl/schema/keys.py): a name (its default
    options) or {name: ..., <option>: ...}, in the schema's message shape `<key> must be ..., got ...`."""
    named = isinstance(data, str) or data is None
    if named:
        data = {"name": data}
    if not isinstance(data, dict):
        raise fail(key, "a sampler name or {name: ..., <option>: ...}", data)
    options = dict(data)
    name = options.pop("name", None)
    what = Choice(*names()).problem(name)
    if what is not None:
        raise fail(key if named else f"{key}.name", what, name)
    check_options(name, options, key)


def check_fits(name: str, capabilities) -> None:
    """Refuse sampler `name` for a model lacking what it needs (diffctl.denoiser.Capabilities)."""
    need = SAMPLERS[name].needs
    if not getattr(capabilities, need):
        raise ConfigError(
            f"sampler={name} needs {NEEDS[need]}; this model predicts {capabilities.prediction!r}: "
            f"sample it with sampler={capabilities.default_sampler}"
        )
