"""Typed config schemas: the one place where a config value's rule lives.

* A choice is an :class:`Choice` enum field: Hydra rejects any other value while composing the config
  (``Invalid value 'exactt', expected one of [exact, mc, empirical]``), before anything runs.
* A range is a field made by :func:`rule` (or :func:`at_least`, :func:`positive`, ...): the check and its
  description sit in the field's metadata, and :func:`uqlora.validate.validate_config` applies them to the
  composed config before anything loads.

Method schemas (``uqlora.methods``) derive from :class:`MethodConfig`; :data:`uqlora.validate.RULES` holds the
rules of the shared config groups (model, data, optim, eval, ...) in the same form.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable


class Choice(str, Enum):
    """An enumerated config value that is also its string (``Fisher.exact == "exact"``, ``f"{x}"`` -> value)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


Check = tuple[Callable[[Any], bool], str]  # (test, description of the valid values)


def int_at_least(lo: int) -> Check:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo), f"an integer >= {lo}"


def number(test: Callable[[float], bool], text: str) -> Check:
    def ok(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and test(float(v))

    return ok, text


def optional(check: Check) -> Check:
    test, text = check
    return (lambda v: v is None or test(v)), f"null or {text}"


def one_of(*values: str) -> Check:
    return (lambda v: v in values), ", ".join(values)


POSITIVE = number(lambda v: v > 0, "a finite number > 0")
NON_NEGATIVE = number(lambda v: v >= 0, "a finite number >= 0")
OPEN_UNIT = number(lambda v: 0 < v < 1, "a number in (0, 1)")
HALF_OPEN_UNIT = number(lambda v: 0 <= v < 1, "a number in [0, 1)")
UNIT = number(lambda v: 0 <= v <= 1, "a number in [0, 1]")
TOP_P = number(lambda v: 0 < v <= 1, "a number in (0, 1]")
SAMPLES = number(lambda v: v >= 0 if float(v).is_integer() else 0 < v < 1, "0, a fraction in (0, 1) or a count >= 1")
POSITIVE_LIST: Check = (lambda xs: isinstance(xs, (list, tuple)) and len(xs) > 0 and all(POSITIVE[0](x) for x in xs),
                        "a non-empty list of finite numbers > 0")


def rule(default: Any, check: Check):
    """A dataclass field with a value rule (lists and dicts become a ``default_factory``)."""
    meta = {"check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def at_least(lo: int, default: int):
    return rule(default, int_at_least(lo))


def positive(default: float):
    return rule(default, POSITIVE)


def non_negative(default: float):
    return rule(default, NON_NEGATIVE)


@dataclass
class MethodConfig:
    """Fields every method has: its registered ``name`` and the label tables print (``display_name``)."""

    name: str = "?"
    display_name: str = ""       # tables and plots; "" -> the method's name


def schema_rules(schema: type, prefix: str = "method") -> dict[str, Check]:
    """``{"method.key": check}`` of every field with a rule in a (nested) schema dataclass."""
    out: dict[str, Check] = {}
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}"
        if "check" in f.metadata:
            out[key] = f.metadata["check"]
        typ = f.type if isinstance(f.type, type) else None
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out.update(schema_rules(f.default_factory, key))
        elif typ is not None and dataclasses.is_dataclass(typ):
            out.update(schema_rules(typ, key))
    return out
