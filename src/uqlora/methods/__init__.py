"""Method registry. A method is one module in this package that

* subclasses :class:`uqlora.methods.base.UQMethod` (trained methods) or
  :class:`uqlora.methods.posthoc.PostHocMethod` (fitted on a named split of a trained adapter),
* decorates it with ``@register("name", SchemaDataclass)``, the schema a :class:`uqlora.schema.MethodConfig`
  whose fields carry their value rules (:mod:`uqlora.schema`),

plus its math in ``core/`` and ``conf/method/<name>.yaml`` (whose defaults list starts with ``<name>_schema``).
Modules are discovered automatically: adding a method needs no edit here or anywhere else.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from uqlora.errors import UqloraError
from uqlora.schema import MethodConfig

METHODS: dict[str, type] = {}
SCHEMAS: dict[str, type] = {}


def register(name: str, schema: type) -> Callable[[type], type]:
    if not (isinstance(schema, type) and issubclass(schema, MethodConfig)):
        raise TypeError(f"method '{name}': its schema must derive from uqlora.schema.MethodConfig")

    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        SCHEMAS[name] = schema
        return cls

    return deco


def discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base", "posthoc"):
            importlib.import_module(f"{__name__}.{mod.name}")


def get_method(name: str) -> type:
    discover()
    if name not in METHODS:
        raise UqloraError(f"unknown method '{name}'; valid choices: {', '.join(sorted(METHODS))}")
    return METHODS[name]
