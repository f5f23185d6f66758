"""Method registry. A method is one module in this package that

* subclasses :class:`uqlora.methods.base.UQMethod`,
* decorates it with ``@register("name", SchemaDataclass)``,

plus ``conf/method/<name>.yaml`` (whose defaults list starts with ``<name>_schema``). Modules are
discovered automatically: adding a method needs no edit here.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from uqlora.errors import UqloraError

METHODS: dict[str, type] = {}
SCHEMAS: dict[str, type] = {}


def register(name: str, schema: type) -> Callable[[type], type]:
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        SCHEMAS[name] = schema
        return cls

    return deco


def discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")


def get_method(name: str) -> type:
    discover()
    if name not in METHODS:
        raise UqloraError(f"unknown method '{name}'; valid choices: {', '.join(sorted(METHODS))}")
    return METHODS[name]
