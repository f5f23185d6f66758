"""Shared pieces of the dataset families: the registry's types, file readers and record builders.

A family module (``arc.py``, ``glue.py``, ...) describes each of its datasets with a :class:`DatasetInfo`
(what it is) and a :class:`Source` (how to read it: local files per split, hub splits per split, the
adapter options it accepts) and exposes them as ``ENTRIES``; :mod:`uqlora.data.registry` assembles the
registry from those tuples.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from uqlora.errors import DataError

CLASSIFICATION = "classification"
MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
HINT = "set paths.data_dir or UQLORA_DATA_DIR"

Record = dict[str, Any]
# load(hub_split, config=...) -> the hub rows of one split (see uqlora.data.sources.hub)
HubLoad = Callable[..., Iterable[Mapping[str, Any]]]


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of one dataset of the registry."""

    name: str  # registry key, e.g. "arc_e"
    task: str  # "classification" | "multiple_choice" | "generation"
    num_classes: int  # classes, or the MAX number of choices for multiple choice; 0 for generation
    label_names: tuple[str, ...] | None  # class names (label words); None for MC
    hub_id: str
    hub_config: str | None
    local_dir: str  # relative to the data dir, e.g. "arc/ARC-Easy" ("" for custom and mixtures)
    splits: dict[str, str]  # split -> where it comes from (local; hub)
    description: str


@dataclass(frozen=True)
class Source:
    """How to read one dataset: local files per split, hub splits per split, options.

    ``read_local(path, split, options, name)`` gets the local file (or folder) of the split;
    ``read_hub(load, hub_split, split, options)`` gets a loader of hub rows (see :func:`hub_simple`).
    """

    local_files: Mapping[str, str]  # split -> file (or folder) relative to the local dir
    read_local: Callable[..., list[Record]]
    hub_splits: Mapping[str, str]  # split -> hub split name
    read_hub: Callable[..., list[Record]]
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mixture:
    """A dataset made of other registered datasets: every split is the concatenation of the parts'
    splits (in ``parts`` order); ``read(load, split, options)`` gets ``load(part, split, **options)``
    (the registry's ``load_split`` with the data dir bound) and returns the mixture's records."""

    parts: tuple[str, ...]
    read: Callable[..., list[Record]]
    options: tuple[str, ...] = ()


class Entry(NamedTuple):
    """One registry entry; ``source`` is None for datasets read from user files (custom)."""

    info: DatasetInfo
    source: Source | Mixture | None


def hub_simple(row_fn: Callable[[Mapping[str, Any], str, int], Record]):
    """Hub reader for datasets with one config: map every row with ``row_fn(row, split, index)``."""

    def read(load: HubLoad, hub_split: str, split: str, options: Mapping[str, Any]):
        return [row_fn(row, split, i) for i, row in enumerate(load(hub_split))]

    return read


# --------------------------------------------------------------------------- messages


def one_line(text: object, limit: int = 300) -> str:
    """Collapse ``text`` to a single line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def choices_list(values: Iterable[str]) -> str:
    return ", ".join(values) if values else "(none)"


def bad_row(path: Path, index: int, why: str) -> DataError:
    return DataError(f"{path}: row {index}: {why}")


# --------------------------------------------------------------------------- file readers


def require_file(path: Path, name: str) -> Path:
    if not path.exists():
        raise DataError(f"dataset '{name}': file {path} not found in the local copy; {HINT}")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({one_line(exc)})") from None
    return rows


def read_json_list(path: Path) -> list[Any]:
    """A JSON file holding one list (of objects)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({one_line(exc)})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    return rows


def read_lines(path: Path) -> list[str]:
    """Lines of a text file split on ``\\n`` only (tweets may contain other separators)."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_tsv(path: Path, quoted: bool = False) -> list[list[str]]:
    """Rows of a tab-separated file; ``quoted=False`` treats ``"`` as a plain character."""
    quoting = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh, delimiter="\t", quoting=quoting))


def read_csv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


# --------------------------------------------------------------------------- record builders


def cls_record(rid: str, text: str, label: int, text_pair: str | None = None) -> Record:
    """A classification record."""
    return {"id": rid, "text": text, "text_pair": text_pair, "label": int(label)}


def mc_record(
    rid: str, question: str, choices: list[str], choice_labels: list[str], answer: str
) -> Record:
    """A multiple-choice record whose answer is given by its source label (e.g. "B")."""
    answer = str(answer).strip()
    if answer not in choice_labels:
        raise DataError(
            f"question {rid}: answer key {answer!r} is not one of its choice labels "
            f"{choices_list(choice_labels)}"
        )
    return {
        "id": rid,
        "question": question,
        "choices": [str(c) for c in choices],
        "label": choice_labels.index(answer),
        "choice_labels": list(choice_labels),
    }


def gen_record(rid: str, prompt: str, response: str, source: str, input_text: str | None = None) -> Record:
    """A generation record: an instruction (``prompt``), an optional ``input`` (None when empty), the
    reference ``response`` and the ``source`` it comes from (e.g. ``gsm8k``, ``gpteacher``)."""
    return {"id": rid, "prompt": prompt, "input": input_text or None, "response": response, "source": source}


def hub_text_label_row(row, split: str, i: int) -> Record:
    """Hub row with ``text`` and an integer ``label`` (SST-5, AG News, TweetEval)."""
    return cls_record(f"{split}-{i}", str(row["text"]).strip(), int(row["label"]))


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def carve_indices(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed (train, test) carve of ``n`` rows, both in file order:
    ``numpy.random.default_rng(seed).permutation(n)``, the first ``round(test_fraction * n)`` indices
    are the test set, the rest the training set."""
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    return sorted(perm[n_test:].tolist()), sorted(perm[:n_test].tolist())
