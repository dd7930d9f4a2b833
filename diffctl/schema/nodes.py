"""Walking a config against its schema: a nested dict of key -> Rule (a leaf) or dict (a node), and
three node kinds that go further. ByTarget picks the keys of a group (model, sde, ...) by the node's
`_target_`; Passthrough also allows the extra arguments of the class it names (`+trainer.profiler=simple`:
Lightning checks those when the Trainer is built); SamplerNode takes a sampler name or {name, **options},
checked by the samplers' registry (diffctl/samplers/registry.py). Any other key not in the schema
is refused with the close matches. Messages: `<key> must be <what>, got <value>`."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from diffctl.errors import ConfigError
from diffctl.schema.rules import Rule, Text, show


class ByTarget:
    """A config group whose keys depend on its `_target_` (model=unet vs dit). A `_target_` not listed
    is the user's own class: its constructor checks its arguments."""

    def __init__(self, variants: dict, null: bool = False):
        target = Text(what="a class path")
        self.variants = {t: {"_target_": target, **keys} if isinstance(keys, dict) else keys for t, keys in variants.items()}
        self.null = null


class Passthrough:
    """A node whose declared keys are checked, and whose other keys are allowed if they are arguments
    of `callable_path()` (a zero-argument function returning the class), checked by that class."""

    def __init__(self, keys: dict, callable_path: Callable[[], Any]):
        self.keys, self.callable_path = keys, callable_path

    def extra_allowed(self) -> set[str] | None:  # None: any (the class takes **kwargs)
        params = inspect.signature(self.callable_path()).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
        return set(params) - {"self"}


class SamplerNode:
    """A sampler: a name (its default options) or {name, **options}. `check(data, key)` raises
    ConfigError for a bad one; it is the samplers' registry (diffctl/samplers/registry.py), which
    imports torch, so keys.py passes a function that imports it on the first check."""

    def __init__(self, check: Callable[[Any, str], None]):
        self.check = check


def unknown_key(key: str, known, command: str) -> ConfigError:
    parent, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, list(known), n=3, cutoff=0.6)
    near = f"; close matches: {', '.join(f'{parent}.{c}' if parent else c for c in close)}" if close else ""
    return ConfigError(f"{key}: no such config key of diffctl {command}{near} (`diffctl {command} --cfg job` prints every key)")


def fail(key: str, what: str, value) -> ConfigError:
    text = show(value)
    return ConfigError(f"{key} must be {what}, got {text if len(text) <= 80 else text[:77] + '...'}")


def check_node(data, schema, prefix: str, command: str, samplers: bool = True) -> None:
    """Check plain `data` (dicts, lists, scalars) against `schema`, naming keys as prefix + key.
    samplers=False skips the sampler nodes (the CLI's torch-free first check, diffctl/cli.py)."""
    if isinstance(schema, Rule):
        what = schema.problem(data)
        if what is not None:
            raise fail(prefix, what, data)
        return
    if isinstance(schema, SamplerNode):
        return schema.check(data, prefix) if samplers else None
    if isinstance(schema, ByTarget):
        if schema.null and (data is None or data == {}):  # an empty group (logger=none) is no group
            return
        if not isinstance(data, dict):
            raise fail(prefix, "a config group (a mapping)" + (" or null" if schema.null else ""), data)
        target = data.get("_target_")
        if not isinstance(target, str):
            raise fail(f"{prefix}._target_", "a class path", target)
        keys = schema.variants.get(target)
        if keys is None:
            return  # the user's own class
        return check_node(data, keys, prefix, command, samplers)
    passthrough = schema if isinstance(schema, Passthrough) else None
    schema = schema.keys if passthrough is not None else schema
    if not isinstance(data, dict):
        raise fail(prefix, "a mapping of keys", data)
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key in schema:
            check_node(value, schema[key], full, command, samplers)
            continue
        # only for a key not declared: the class (Lightning's Trainer) is imported to read its arguments
        extra = passthrough.extra_allowed() if passthrough is not None else set()
        if extra is not None and key not in extra:
            raise unknown_key(full, [*schema, *sorted(extra)], command)
