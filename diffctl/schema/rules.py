"""The rule types of the config schema: a leaf's type, range or choices. `Rule.problem(value)` says
what the value must be (None: allowed); every number must be finite. Each rule also gives a value of
the wrong type and one out of range, which tests/test_bad_inputs_schema.py feeds to every key."""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from typing import Any

MISSING = "???"  # OmegaConf's mark of a required value that was not given


def show(value: Any) -> str:
    """A value as the user wrote it on the command line (true, null, 'abc', [1.5, 0.9], inf)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Rule(ABC):
    """A leaf: `problem(value)` is None when the value is allowed, else what it must be."""

    def __init__(self, null: bool = False, hint: str | None = None, what: str | None = None):
        self.null, self.hint, self.what_text = null, hint, what

    @abstractmethod
    def describe(self) -> str:
        """The type (and range), e.g. "a number in [0, 1)"."""

    @abstractmethod
    def bad(self, value) -> str | None:
        """None when the (non-null) value is allowed, else what it must be."""

    def _full(self, text: str) -> str:
        text = self.what_text or text
        if self.null and self.what_text is None:
            text += " or null"
        return f"{text} ({self.hint})" if self.hint else text

    def problem(self, value) -> str | None:
        if value is None:
            return None if self.null else self._full(self.describe())
        if isinstance(value, str) and value == MISSING:
            return "set (it has no default)"
        what = self.bad(value)
        return None if what is None else self._full(what)

    def wrong_type(self):  # a value of the wrong type, for the schema-walking test
        return [[1]]

    def wrong_types(self) -> list:  # all those it feeds
        return [self.wrong_type()]

    def out_of_range(self) -> list:  # values of the allowed type outside the range / choices ([]: none exist)
        return []


class Int(Rule):
    def __init__(self, lo: int | None = None, hi: int | None = None, **kw):
        super().__init__(**kw)
        self.lo, self.hi = lo, hi

    def describe(self) -> str:
        if self.lo == 1 and self.hi is None:
            return "a positive integer"
        if self.hi is None:
            return "an integer" + (f" >= {self.lo}" if self.lo is not None else "")
        return f"an integer in [{self.lo}, {self.hi}]"

    def bad(self, value):
        ok = _is_int(value) and (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)
        return None if ok else self.describe()

    def wrong_type(self):
        return "abc"

    def wrong_types(self):  # 1.5 and true are not integers either
        return ["abc", 1.5, True]

    def out_of_range(self):
        return [b for b in (None if self.lo is None else self.lo - 1, None if self.hi is None else self.hi + 1) if b is not None]


class Float(Rule):
    """A finite number (ints allowed) with optional bounds: ge/gt below, le/lt above."""

    def __init__(self, ge=None, gt=None, le=None, lt=None, **kw):
        super().__init__(**kw)
        self.ge, self.gt, self.le, self.lt = ge, gt, le, lt

    def range(self) -> str:
        lo, hi = (self.ge, "[") if self.ge is not None else (self.gt, "("), (self.le, "]") if self.le is not None else (self.lt, ")")
        if lo[0] is not None and hi[0] is not None:
            return f"in {lo[1]}{lo[0]}, {hi[0]}{hi[1]}"
        if lo[0] is not None:
            return f"{'>=' if lo[1] == '[' else '>'} {lo[0]}"
        if hi[0] is not None:
            return f"{'<=' if hi[1] == ']' else '<'} {hi[0]}"
        return ""

    def describe(self) -> str:
        return f"a number {self.range()}".rstrip()

    def bad(self, value):
        if not _is_number(value):
            return self.describe()
        if not math.isfinite(value):
            return f"a finite number {self.range()}".rstrip()
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))  # fmt: skip
        return None if ok else self.range()  # the type is right: say the range only

    def wrong_type(self):
        return "abc"

    def wrong_types(self):
        return ["abc", True]

    def out_of_range(self):
        bounds = [b + step for b, step in ((self.ge, -1), (self.gt, 0), (self.le, 1), (self.lt, 0)) if b is not None]
        return [*bounds, float("nan"), float("inf"), float("-inf")]


class Bool(Rule):
    def describe(self) -> str:
        return "true or false"

    def bad(self, value):
        return None if isinstance(value, bool) else self.describe()

    def wrong_type(self):
        return "yes"

    def wrong_types(self):
        return ["yes", 1]


class Choice(Rule):
    """One of the listed values (compared with their type: 1 is not true). as_text: an integer given
    for a name made of digits counts as that name (precision=32 is "32")."""

    def __init__(self, *choices, sep: str = ", ", as_text: bool = False, **kw):
        super().__init__(**kw)
        self.choices, self.sep, self.as_text = tuple(choices), sep, as_text

    def describe(self) -> str:
        return "one of " + self.sep.join(show(c) if not isinstance(c, str) else c for c in self.choices)

    def bad(self, value):
        if self.as_text and _is_int(value):
            value = str(value)
        hit = any(type(value) is type(c) and value == c for c in self.choices)
        return None if hit else self.describe()

    def wrong_type(self):
        return [1] if any(isinstance(c, str) for c in self.choices) else "abc"

    def out_of_range(self):
        return ["not-a-choice" if any(isinstance(c, str) for c in self.choices) else 12345]


class Text(Rule):
    """Any non-empty string (paths, names); `what` says which."""

    def __init__(self, what: str = "a path", empty: bool = False, **kw):
        super().__init__(**kw)
        self.name, self.empty = what, empty

    def describe(self) -> str:
        return self.name

    def bad(self, value):
        return None if isinstance(value, str) and (value or self.empty) else self.describe()


class Pattern(Text):
    def __init__(self, regex: str, what: str, **kw):
        super().__init__(what=what, **kw)
        self.regex = re.compile(regex)

    def bad(self, value):
        return None if isinstance(value, str) and self.regex.fullmatch(value) else self.describe()

    def out_of_range(self):
        return ["not-a-device"]


class Seq(Rule):
    """A list of items each allowed by `item`, of a given length (or at least min_len)."""

    def __init__(self, item: Rule, what: str, length: int | None = None, min_len: int = 0, unique: bool = False, **kw):
        super().__init__(**kw)
        self.item, self.name, self.length, self.min_len, self.unique = item, what, length, min_len, unique

    def describe(self) -> str:
        return self.name

    def bad(self, value):
        if not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length):
            return self.describe()
        if len(value) < self.min_len or any(v is None or self.item.bad(v) for v in value):
            return self.describe()
        if self.unique and len(set(map(show, value))) != len(value):
            return self.describe()
        return None

    def wrong_type(self):
        return "abc"

    def out_of_range(self):
        n = self.length or max(self.min_len, 1)
        wrong_length = [[]] if self.length or self.min_len else []
        return [*([bad] * n for bad in self.item.out_of_range() or [self.item.wrong_type()]), *wrong_length]


class Numbers(Rule):
    """A number or nested lists of numbers (an array: the mixture's means, scales, ...), all finite
    and >= ge / > gt when given. scalar: a bare number is allowed too."""

    def __init__(self, what: str, ge=None, gt=None, scalar: bool = False, **kw):
        super().__init__(**kw)
        self.name, self.ge, self.gt, self.scalar = what, ge, gt, scalar

    def describe(self) -> str:
        return self.name

    def _leaves(self, value):
        if isinstance(value, (list, tuple)):
            for v in value:
                yield from self._leaves(v)
        else:
            yield value

    def bad(self, value):
        if not isinstance(value, (list, tuple)) and not self.scalar:
            return self.describe()
        for v in self._leaves(value):
            if not _is_number(v) or not math.isfinite(v) or (self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt):
                return self.describe()
        return None

    def wrong_type(self):
        return "abc"

    def out_of_range(self):
        below = [] if self.ge is None and self.gt is None else [[(self.ge if self.ge is not None else self.gt) - 1]]
        return [[[float("nan")]], [float("inf")], *below]


class AnyOf(Rule):
    def __init__(self, *rules: Rule, what: str, **kw):
        super().__init__(**kw)
        self.rules, self.name = rules, what

    def describe(self) -> str:
        return self.name

    def bad(self, value):
        return None if any(r.bad(value) is None for r in self.rules) else self.describe()

    def wrong_type(self):
        return {"a": 1}

    def out_of_range(self):  # the examples of its rules that none of them allows
        return [e for r in self.rules for e in r.out_of_range() if self.bad(e) is not None]


