"""WinoGrande 1.1: ``wg_s`` (training size S) and ``wg_m`` (size M).

Local ``winogrande/train_s.jsonl`` (640) / ``train_m.jsonl`` (2558) -> train, ``dev.jsonl`` (1267)
-> test (the official test set is unlabelled); hub ``allenai/winogrande`` ``winogrande_{s,m}`` train,
validation -> test. No validation split.

Rows (``qID``, ``sentence`` with one ``_``, ``option1``, ``option2``, ``answer`` "1"/"2") become
multiple-choice records with ``choices == [option1, option2]``, ``label == int(answer) - 1``,
``choice_labels == ["1", "2"]`` and ``cloze`` pairs for partial scoring: ``context`` is the sentence
before ``_`` with the option substituted, ``continuation`` the text after ``_`` (with its leading space).
"""

from __future__ import annotations

from pathlib import Path

from uqlora.data.sources.common import (
    MULTIPLE_CHOICE,
    DatasetInfo,
    Entry,
    Record,
    Source,
    hub_simple,
    read_jsonl,
)
from uqlora.errors import DataError


def wg_record(rid: str, sentence: str, option1: str, option2: str, answer) -> Record:
    blank = sentence.find("_")
    if blank < 0:
        raise DataError(f"WinoGrande question {rid}: sentence has no '_' blank")
    answer = str(answer).strip()
    if answer not in ("1", "2"):
        raise DataError(f"WinoGrande question {rid}: answer {answer!r} is not '1' or '2'")
    before, after = sentence[:blank], sentence[blank + 1 :]
    return {
        "id": rid,
        "question": sentence,
        "choices": [option1, option2],
        "label": int(answer) - 1,
        "choice_labels": ["1", "2"],
        "cloze": [[before + option1, after], [before + option2, after]],
    }


def read_local(path: Path, split: str, options, name: str) -> list[Record]:
    return [
        wg_record(str(r["qID"]), r["sentence"], r["option1"], r["option2"], r["answer"])
        for r in read_jsonl(path)
    ]


def hub_row(row, split: str, i: int) -> Record:
    return wg_record(f"{split}-{i}", row["sentence"], row["option1"], row["option2"],
                     row["answer"])  # fmt: skip


def _entry(name: str, size: str, n_train: int) -> Entry:
    info = DatasetInfo(
        name=name,
        task=MULTIPLE_CHOICE,
        num_classes=2,
        label_names=None,
        hub_id="allenai/winogrande",
        hub_config=f"winogrande_{size}",
        local_dir="winogrande",
        splits={
            "train": f"train_{size} ({n_train}); hub winogrande_{size} train",
            "test": "official dev (1267; the official test set is unlabelled); hub validation",
        },
        description=f"WinoGrande 1.1, training size {size.upper()}: fill-in-the-blank pronoun "
        "resolution with two options; records carry cloze pairs for partial scoring. "
        "No validation split.",
    )
    source = Source(
        local_files={"train": f"train_{size}.jsonl", "test": "dev.jsonl"},
        read_local=read_local,
        hub_splits={"train": "train", "test": "validation"},
        read_hub=hub_simple(hub_row),
    )
    return Entry(info, source)


ENTRIES = (_entry("wg_s", "s", 640), _entry("wg_m", "m", 2558))
