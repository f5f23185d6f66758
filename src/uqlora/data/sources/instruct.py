"""Instruction-following data with reference responses (``instruct``; generation).

Two local sources under ``instruct/``, each carved into a fixed train / test split because neither has
an official test split: ``numpy.random.default_rng(0).permutation(n)``, the first 20 % of the permuted
indices are the test set, the rest the training set, both in file order (the BoolQ carve):

* ``gpteacher`` -- GPTeacher roleplay (``gpteacher_roleplay.json``, a JSON list of 1923
  ``{instruction, input, response}``; MIT): train 1538 / test 385. ``id`` = ``"gpteacher-<row>"``.
* ``self_instruct`` -- Self-Instruct's user-oriented tasks with expert outputs
  (``self_instruct_user_oriented.jsonl``, 252 tasks ``{id, motivation_app, instruction,
  instances[{input, output}]}``; Apache-2.0): the carve is over *tasks* (train 202 / test 50), and each
  instance becomes one record (every task in this file has exactly one instance), so all instances of a
  task stay in one split. ``id`` = the task id, with ``-<k>`` appended for its k-th instance (k >= 1).

Option ``sources`` (default: both) selects sources. Records: ``prompt`` = instruction, ``input`` = the
instance's input (None when empty), ``response``, ``source`` (``gpteacher`` / ``self_instruct``).

Online (no local ``instruct/`` folder): hub ``GAIR/lima`` -- *not the same data* (LIMA's 1030 curated
prompts; the hub copy is gated). Its test split has no responses, so its train split is carved 80/20
the same way; each conversation gives one record (its first user turn and first answer), ``source`` =
``lima``, ``id`` = ``"lima-<row>"``. The ``sources`` option applies to the local files only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from uqlora.data.sources.common import (
    GENERATION,
    DatasetInfo,
    Entry,
    HubLoad,
    Record,
    Source,
    bad_row,
    carve_indices,
    choices_list,
    gen_record,
    read_json_list,
    read_jsonl,
    require_file,
)
from uqlora.errors import DataError

TEST_FRACTION = 0.2
SEED = 0
FILES = {"gpteacher": "gpteacher_roleplay.json", "self_instruct": "self_instruct_user_oriented.jsonl"}
SOURCES = tuple(FILES)


def sources_of(options: Mapping[str, Any], valid: tuple[str, ...] = SOURCES, name: str = "instruct") -> list[str]:
    """The selected sources, in ``valid`` order (all of them when ``options["sources"]`` is None)."""
    sources = options.get("sources")
    if sources is None:
        return list(valid)
    sources = [sources] if isinstance(sources, str) else [str(s) for s in sources]
    bad = [f"unknown source '{s}'" for s in sources if s not in valid] or ([] if sources else ["empty sources list"])
    if bad:
        raise DataError(f"{name}: {bad[0]}; valid sources: {choices_list(valid)} (null = all)")
    return [s for s in valid if s in sources]


def _pick(split: str, n: int) -> list[int]:
    """Row indices of ``split`` in the fixed 80/20 carve of ``n`` rows."""
    train_idx, test_idx = carve_indices(n, TEST_FRACTION, SEED)
    return train_idx if split == "train" else test_idx


def read_gpteacher(path: Path, split: str) -> list[Record]:
    rows = read_json_list(path)
    out = []
    for i in _pick(split, len(rows)):
        row = rows[i]
        if not isinstance(row, dict) or not {"instruction", "response"} <= set(row):
            raise bad_row(path, i, "expected an object with instruction, input, response")
        out.append(gen_record(f"gpteacher-{i}", row["instruction"], row["response"], "gpteacher",
                              row.get("input")))  # fmt: skip
    return out


def read_self_instruct(path: Path, split: str) -> list[Record]:
    tasks = read_jsonl(path)
    out = []
    for i in _pick(split, len(tasks)):
        task = tasks[i]
        instances = task.get("instances") or []
        if not instances:
            raise bad_row(path, i, f"task {task.get('id')!r} has no instances")
        for k, inst in enumerate(instances):
            rid = str(task["id"]) if k == 0 else f"{task['id']}-{k}"
            out.append(gen_record(rid, task["instruction"], inst["output"], "self_instruct", inst.get("input")))
    return out


_READERS = {"gpteacher": read_gpteacher, "self_instruct": read_self_instruct}


def read_local(path: Path, split: str, options, name: str) -> list[Record]:
    out = []
    for source in sources_of(options):
        out.extend(_READERS[source](require_file(path / FILES[source], name), split))
    return out


def read_hub(load: HubLoad, hub_split: str, split: str, options) -> list[Record]:
    if options.get("sources") is not None:
        raise DataError("instruct: option sources selects local files (gpteacher, self_instruct); the hub "
                        "copy GAIR/lima is one source -- remove the option or provide the local folder")
    pairs = [(i, row["conversations"]) for i, row in enumerate(load(hub_split)) if len(row["conversations"]) >= 2]
    out = []
    for j in _pick(split, len(pairs)):
        i, conv = pairs[j]
        out.append(gen_record(f"lima-{i}", conv[0], conv[1], "lima"))
    return out


ENTRIES = (
    Entry(
        DatasetInfo(
            name="instruct",
            task=GENERATION,
            num_classes=0,
            label_names=None,
            hub_id="GAIR/lima",
            hub_config=None,
            local_dir="instruct",
            splits={
                "train": "local: 80% carve of each source (GPTeacher roleplay 1538 + Self-Instruct "
                "user-oriented 202 = 1740; default_rng(0) permutation, the last 80%); hub: 80% carve "
                "of GAIR/lima train (different data)",
                "test": "local: 20% carve of each source (385 + 50 = 435; the first 20% of the "
                "permutation); hub: 20% carve of GAIR/lima train",
            },
            description="Instructions with reference responses: GPTeacher roleplay and "
            "Self-Instruct user-oriented tasks (option sources selects them); fixed seeded test "
            "carve, no official test split. No validation split.",
        ),
        Source(
            local_files={"train": ".", "test": "."},
            read_local=read_local,
            hub_splits={"train": "train", "test": "train"},
            read_hub=read_hub,
            options=("sources",),
        ),
    ),
)
