"""The dataset registry, assembled from the family modules of :mod:`uqlora.data.sources`, and the
functions that read it: :func:`get_info`, :func:`available_datasets`, :func:`available_splits`,
:func:`load_split`, :func:`default_data_dir` and :func:`verify_files` (re-exported by
:mod:`uqlora.data.datasets`, where the record formats are described).

Each dataset is read from ``<data dir>/<info.local_dir>`` when that folder exists, else from the
Hugging Face hub (:mod:`uqlora.data.sources.hub`); the custom datasets read the user's files
(:mod:`uqlora.data.sources.custom`); a mixture (:class:`~uqlora.data.sources.common.Mixture`, e.g.
``instruct_mix``) reads each of its parts as its own dataset. Every user-facing failure is a one-line
:class:`~uqlora.errors.DataError` naming the bad value and the valid choices.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from uqlora.data.sources import FAMILIES, custom
from uqlora.data.sources.common import DatasetInfo, Entry, Mixture, Source, choices_list, require_file
from uqlora.data.sources.hub import load_from_hub
from uqlora.errors import DataError

ENV_DATA_DIR = "UQLORA_DATA_DIR"
CHECKSUMS_FILE = "SHA256SUMS"


def assemble(families: Iterable[ModuleType]) -> dict[str, Entry]:
    """Name -> entry over every family's ``ENTRIES``; a name registered twice, or a mixture of an
    unregistered part, is an error."""
    entries: dict[str, Entry] = {}
    for family in families:
        for entry in family.ENTRIES:
            name = entry.info.name
            if name in entries:
                raise ValueError(f"dataset '{name}' is registered twice (again in {family.__name__})")
            entries[name] = entry
    for name, entry in entries.items():
        missing = [p for p in getattr(entry.source, "parts", ()) if p not in entries]
        if missing:
            raise ValueError(f"mixture '{name}' has unregistered parts: {', '.join(missing)}")
    return entries


ENTRIES = assemble(FAMILIES)
DATASETS: dict[str, DatasetInfo] = {name: e.info for name, e in ENTRIES.items()}
_SOURCES: dict[str, Source | Mixture] = {n: e.source for n, e in ENTRIES.items() if e.source is not None}


def available_datasets() -> list[str]:
    """Registry names, sorted."""
    return sorted(DATASETS)


def _base_info(name: str) -> DatasetInfo:
    info = DATASETS.get(name)
    if info is None:
        raise DataError(
            f"unknown dataset '{name}'; valid choices: {choices_list(available_datasets())}"
        )
    return info


def _check_options(name: str, options: Mapping[str, Any]) -> None:
    allowed = custom.OPTIONS.get(name) or _SOURCES[name].options
    unknown = sorted(k for k in options if k not in allowed)
    if unknown:
        raise DataError(
            f"dataset '{name}': unknown option(s) {', '.join(unknown)}; valid options: "
            f"{choices_list(allowed)}"
        )


def get_info(name: str, **options: Any) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``.

    For the custom datasets ``num_classes`` and ``label_names`` come from the options
    (see :func:`uqlora.data.sources.custom.resolve_info`).
    """
    info = _base_info(name)
    _check_options(name, options)
    if name in custom.OPTIONS:
        return custom.resolve_info(info, options)
    return info


def _find_repo_root() -> Path | None:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    # Source checkout without pyproject.toml yet: <root>/src/uqlora/data/registry.py.
    if len(here.parents) > 3 and here.parents[2].name == "src":
        return here.parents[3]
    return None


def default_data_dir() -> Path:
    """``$UQLORA_DATA_DIR`` if set, else the first existing of ``<repo root>/../shared/data``
    and ``./../shared/data``; else the first candidate."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    candidates = []
    root = _find_repo_root()
    if root is not None:
        candidates.append(root.parent / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[0]


def _resolve_data_dir(data_dir: str | Path | None) -> Path:
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser()


def available_splits(name: str, data_dir: str | Path | None = None, **options: Any) -> list[str]:
    """Splits that :func:`load_split` can return for ``name``: the local copy's splits
    when its folder exists under the data dir, else the hub's (custom: the files given)."""
    _base_info(name)
    _check_options(name, options)
    if name in custom.OPTIONS:
        return list(custom.files_of(name, options))
    info, source = DATASETS[name], _SOURCES[name]
    if isinstance(source, Mixture):
        return _mixture_splits(source, data_dir)
    folder = _resolve_data_dir(data_dir) / info.local_dir
    return list(source.local_files if folder.is_dir() else source.hub_splits)


def load_split(
    name: str, split: str, data_dir: str | Path | None = None, **options: Any
) -> list[dict]:
    """Records of one split of dataset ``name`` (formats: :mod:`uqlora.data.datasets`).

    Reads ``<data_dir>/<info.local_dir>`` when that folder exists, else the hub; the custom datasets
    read ``options["files"][split]`` (:mod:`uqlora.data.sources.custom`). Raises :class:`DataError`
    (one line) for an unknown dataset, option or split, a missing file, a malformed row, or an
    unreachable hub.
    """
    info = _base_info(name)
    _check_options(name, options)
    if name in custom.OPTIONS:
        return custom.load(name, split, data_dir, options)
    source = _SOURCES[name]
    if isinstance(source, Mixture):
        return _load_mixture(name, source, split, data_dir, options)
    folder = _resolve_data_dir(data_dir) / info.local_dir
    local = folder.is_dir()
    splits = source.local_files if local else source.hub_splits
    if split not in splits:
        where = f"local copy {folder}" if local else f"hub {info.hub_id}"
        raise DataError(
            f"dataset '{name}' has no split '{split}' ({where}); valid splits: "
            f"{choices_list(list(splits))}"
        )
    if local:
        path = require_file(folder / source.local_files[split], name)
        return source.read_local(path, split, options, name)
    return load_from_hub(info, source, split, folder, options)


def _mixture_splits(mixture: Mixture, data_dir: str | Path | None) -> list[str]:
    """The splits every part has, in the first part's order."""
    per_part = [available_splits(part, data_dir) for part in mixture.parts]
    return [s for s in per_part[0] if all(s in other for other in per_part[1:])]


def _load_mixture(
    name: str, mixture: Mixture, split: str, data_dir: str | Path | None, options: Mapping[str, Any]
) -> list[dict]:
    splits = _mixture_splits(mixture, data_dir)
    if split not in splits:
        raise DataError(
            f"dataset '{name}' has no split '{split}' (a mixture of {', '.join(mixture.parts)}); "
            f"valid splits: {choices_list(splits)}"
        )

    def load(part: str, part_split: str, **part_options: Any) -> list[dict]:
        return load_split(part, part_split, data_dir, **part_options)

    return mixture.read(load, split, options)


def _listed_checksums(sums: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of a ``<hash>  ./<relative path>`` file (empty if absent)."""
    listed: dict[str, str] = {}
    if sums.is_file():
        for line in sums.read_text().splitlines():
            parts = line.split(maxsplit=1)
            if len(parts) == 2:
                listed[parts[1].strip().lstrip("*").removeprefix("./")] = parts[0].lower()
    return listed


def verify_files(name: str, data_dir: str | Path | None = None) -> dict[str, str]:
    """SHA-256 of every file of dataset ``name``'s local folder, checked against the data dir's
    ``SHA256SUMS`` (``<hash>  ./<relative path>`` lines, as in ``../shared/data``) when it lists them.

    Returns ``{relative path: sha256}`` for ``results.json`` (empty for hub and custom datasets). A file
    whose hash differs from the listed one raises :class:`DataError` in one line naming the file; files
    the checksum list does not mention are hashed but not checked."""
    if name in custom.OPTIONS or name not in DATASETS:
        return {}
    source = _SOURCES[name]
    if isinstance(source, Mixture):
        return {rel: h for part in source.parts for rel, h in verify_files(part, data_dir).items()}
    root = _resolve_data_dir(data_dir)
    folder = root / DATASETS[name].local_dir
    return _hash_folder(folder, root) if folder.is_dir() else {}


def _hash_folder(folder: Path, root: Path) -> dict[str, str]:
    """``{path relative to root: sha256}`` of every file under ``folder``, checked against the
    ``SHA256SUMS`` of ``root`` where it lists the file."""
    sums = root / CHECKSUMS_FILE
    listed = _listed_checksums(sums)
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        want = listed.get(rel)
        if want is not None and want != digest:
            raise DataError(f"data file '{path}' has sha256 {digest[:12]}... but {sums} lists {want[:12]}...: "
                            "the file was modified or corrupted; restore the original copy")
        out[rel] = digest
    return out
