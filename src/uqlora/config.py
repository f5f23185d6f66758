"""Hydra set-up shared by the entry points: resolvers and the typed method schemas.

Each method registers a dataclass (``methods.register(name, Schema)``); it is stored in the
ConfigStore as ``method/<name>_schema`` and ``conf/method/<name>.yaml`` lists it first in its
defaults, so a misspelled ``method.*`` key fails at composition time.
"""
from __future__ import annotations

import uuid

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

_DONE = False


def register_configs() -> None:
    global _DONE
    if _DONE:
        return
    # ${uid:} -- a short random suffix so two runs never share an output directory
    OmegaConf.register_new_resolver("uid", lambda: uuid.uuid4().hex[:6], use_cache=True)
    from uqlora.methods import SCHEMAS, discover

    discover()
    cs = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        cs.store(group="method", name=f"{name}_schema", node=schema)
    _DONE = True
