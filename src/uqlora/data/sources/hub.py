"""Reading a registered dataset's split from the Hugging Face hub (when its local folder is absent).

One attempt, no retries: offline mode (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``), a missing
``datasets`` package, a network or schema error all become one :class:`~uqlora.errors.DataError` line
naming the dataset, the local folder that was not found and the hub id. The hub library keeps its own
cache; nothing else is cached.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from uqlora.data.sources.common import HINT, DatasetInfo, Record, Source, one_line
from uqlora.errors import DataError

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_flag() -> str | None:
    """The first offline variable that is set to a true value, else None."""
    for var in OFFLINE_ENV:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def load_from_hub(
    info: DatasetInfo, source: Source, split: str, folder: Path, options: Mapping[str, Any]
) -> list[Record]:
    """Read one split from the hub, once (no retries); any failure is a one-line DataError."""

    def fail(reason: str, config: str | None) -> DataError:
        cfg = f" (config {config})" if config else ""
        return DataError(
            one_line(
                f"dataset '{info.name}': local folder {folder} not found and hub dataset "
                f"'{info.hub_id}'{cfg} could not be loaded: {reason}; {HINT}",
                limit=600,
            )
        )

    flag = offline_flag()
    if flag:
        raise fail(f"{flag} is set (offline mode)", info.hub_config)
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise fail(f"the 'datasets' package is not importable ({exc})", info.hub_config) from None

    def load(hub_split: str, config: str | None = info.hub_config) -> list[Mapping[str, Any]]:
        try:
            if config is None:
                ds = load_dataset(info.hub_id, split=hub_split)
            else:
                ds = load_dataset(info.hub_id, config, split=hub_split)
            return list(ds)
        except Exception as exc:  # network, auth, missing config/split, ...
            raise fail(f"{type(exc).__name__}: {exc}", config) from None

    try:
        return source.read_hub(load, source.hub_splits[split], split, options)
    except (LookupError, TypeError, ValueError) as exc:
        raise DataError(
            one_line(f"dataset '{info.name}': unexpected hub schema in '{info.hub_id}': "
                     f"{type(exc).__name__}: {exc}")  # fmt: skip
        ) from None
