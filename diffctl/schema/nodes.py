"""Walking a config against its schema: a nested dict of key -> Rule (a leaf) or dict (a node), and
three node kinds that go further. ByTarget picks the keys of a group (model, sde, ...) by the node's
`_target_`; Passthrough also allows the extra arguments of the class it names (`+trainer.profiler=simple`:
Lightning checks those when the Trainer is built); SamplerNode takes a sampler name or {name, **options},
with the options each sampler declares (diffctl.samplers.OPTION_RULES). Any other key not in the schema
is refused with the close matches. Messages: `<key> must be <what>, got <value>`."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from diffctl.errors import ConfigError
from diffctl.schema.rules import Choice, Rule, Text, show


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
    """A sampler: a name (its default options) or {name, **options}; `options(name)` gives the
    sampler's option rules (derived from what the samplers declare)."""

    def __init__(self, names: tuple[str, ...], options: Callable[[str], dict]):
        self.names, self.options = names, options


def unknown_key(key: str, known, command: str) -> ConfigError:
    parent, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, list(known), n=3, cutoff=0.6)
    near = f"; close matches: {', '.join(f'{parent}.{c}' if parent else c for c in close)}" if close else ""
    return ConfigError(f"{key}: no such config key of diffctl {command}{near} (`diffctl {command} --cfg job` prints every key)")


def _fail(key: str, what: str, value) -> ConfigError:
    text = show(value)
    return ConfigError(f"{key} must be {what}, got {text if len(text) <= 80 else text[:77] + '...'}")


def check_node(data, schema, prefix: str, command: str) -> None:
    """Check plain `data` (dicts, lists, scalars) against `schema`, naming keys as prefix + key."""
    if isinstance(schema, Rule):
        what = schema.problem(data)
        if what is not None:
            raise _fail(prefix, what, data)
        return
    if isinstance(schema, SamplerNode):
        return check_sampler_node(data, schema, prefix, command)
    if isinstance(schema, ByTarget):
        if schema.null and (data is None or data == {}):  # an empty group (logger=none) is no group
            return
        if not isinstance(data, dict):
            raise _fail(prefix, "a config group (a mapping)" + (" or null" if schema.null else ""), data)
        target = data.get("_target_")
        if not isinstance(target, str):
            raise _fail(f"{prefix}._target_", "a class path", target)
        keys = schema.variants.get(target)
        if keys is None:
            return  # the user's own class
        return check_node(data, keys, prefix, command)
    passthrough = schema if isinstance(schema, Passthrough) else None
    schema = schema.keys if passthrough is not None else schema
    if not isinstance(data, dict):
        raise _fail(prefix, "a mapping of keys", data)
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key in schema:
            check_node(value, schema[key], full, command)
            continue
        # only for a key not declared: the class (Lightning's Trainer) is imported to read its arguments
        extra = passthrough.extra_allowed() if passthrough is not None else set()
        if extra is not None and key not in extra:
            raise unknown_key(full, [*schema, *sorted(extra)], command)


def check_sampler_node(data, node: SamplerNode, prefix: str, command: str) -> None:
    named = isinstance(data, str) or data is None  # a name alone: its default options
    if named:
        data = {"name": data}
    if not isinstance(data, dict):
        raise _fail(prefix, "a sampler name or {name: ..., <option>: ...}", data)
    name = data.get("name")
    what = Choice(*node.names).problem(name)
    if what is not None:
        raise _fail(prefix if named else f"{prefix}.name", what, name)
    rules = node.options(name)
    unknown = sorted(set(data) - set(rules) - {"name"})
    if unknown:  # the wording check_sampler has always used
        raise ConfigError(f"{prefix}={name} has no option {', '.join(unknown)}; its options are: {', '.join(rules) or 'none'}")
    for key, value in data.items():
        if key != "name":
            check_node(value, rules[key], f"{prefix}.{key}", command)
