"""Atomic writes: a file is written next to its target and renamed, so a killed run never leaves a
truncated ``results.json``, predictions file or state. In a multi-process (DDP) run only global rank 0
writes: every rank runs the same pipeline on the same state (see :mod:`uqlora.distributed`)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path`` (parents created), then rename it over ``path``.
    The file gets the usual mode (0666 minus the umask) rather than mkstemp's 0600. Ranks > 0 of a
    multi-process run write nothing (rank 0 holds the same state and writes it once)."""
    from uqlora.distributed import is_global_zero

    path = Path(path)
    if not is_global_zero():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable).encode()))


def atomic_npz(path: str | Path, **arrays) -> Path:
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
