"""OpenBookQA (``obqa``, main config).

Local ``openbookqa/train/dev/test.tsv`` (header ``ID, Question Stem, Choices, Complete Question,
Answer Key``; choices as ``"(A) .. (B) .."``) -> train / validation / test; hub ``allenai/openbookqa``
``main`` train / validation / test.
"""

from __future__ import annotations

import re
from pathlib import Path

from uqlora.data.sources.common import (
    MULTIPLE_CHOICE,
    DatasetInfo,
    Entry,
    Record,
    Source,
    bad_row,
    choices_list,
    hub_simple,
    mc_record,
    one_line,
    read_tsv,
)
from uqlora.errors import DataError

HEADER = ["ID", "Question Stem", "Choices", "Complete Question", "Answer Key"]
_LETTER_MARK = re.compile(r"\(([A-Z])\) ")


def parse_lettered_choices(text: str) -> tuple[list[str], list[str]]:
    """Split ``"(A) x (B) y ..."`` into texts and labels.

    Only markers in sequence (A, then B, ...) start a new choice: one training question
    (12-1145) repeats ``(D)`` inside its last choice, which stays part of that choice.
    """
    marks, expected = [], "A"
    for m in _LETTER_MARK.finditer(text):
        if m.group(1) == expected:
            marks.append(m)
            expected = chr(ord(expected) + 1)
    if not marks or marks[0].start() != 0:
        raise DataError(f"cannot parse choices {one_line(text, 120)!r}: expected '(A) ...'")
    ends = [m.start() for m in marks[1:]] + [len(text)]
    choices = [text[m.end() : end].strip() for m, end in zip(marks, ends)]
    return choices, [m.group(1) for m in marks]


def read_local(path: Path, split: str, options, name: str) -> list[Record]:
    rows = read_tsv(path)
    if not rows or rows[0] != HEADER:
        head = rows[0] if rows else []
        raise DataError(
            f"{path}: unexpected header {choices_list(head)}; expected {choices_list(HEADER)}"
        )
    out = []
    for i, row in enumerate(rows[1:], 1):
        if len(row) != 5:
            raise bad_row(path, i, f"expected 5 tab-separated fields, got {len(row)}")
        choices, labels = parse_lettered_choices(row[2])
        out.append(mc_record(row[0], row[1], choices, labels, row[4]))
    return out


def hub_row(row, split: str, i: int) -> Record:
    ch = row["choices"]
    return mc_record(str(row["id"]), row["question_stem"], list(ch["text"]),
                     [str(x) for x in ch["label"]], row["answerKey"])  # fmt: skip


ENTRIES = (
    Entry(
        DatasetInfo(
            name="obqa",
            task=MULTIPLE_CHOICE,
            num_classes=4,
            label_names=None,
            hub_id="allenai/openbookqa",
            hub_config="main",
            local_dir="openbookqa",
            splits={
                "train": "official train (4957); hub train",
                "validation": "official dev (500); hub validation",
                "test": "official test (500); hub test",
            },
            description="OpenBookQA (main): elementary science questions with 4 choices "
            "A-D, parsed from the '(A) .. (B) ..' choices column of the official tsv.",
        ),
        Source(
            local_files={"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"},
            read_local=read_local,
            hub_splits={"train": "train", "validation": "validation", "test": "test"},
            read_hub=hub_simple(hub_row),
        ),
    ),
)
