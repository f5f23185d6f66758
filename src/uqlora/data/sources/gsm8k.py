"""GSM8K (``gsm8k``): grade-school math word problems with worked answers (generation).

Local ``gsm8k/train.jsonl`` (7473) / ``test.jsonl`` (1319), one ``{question, answer}`` object per line
-> train / test; hub ``openai/gsm8k`` ``main`` train / test. No validation split. The answer is the
worked solution (with its ``<<48/2=24>>`` calculator annotations) ending in a line ``#### <number>``.

Records: ``prompt`` = question, ``input`` = None, ``response`` = the full worked answer (kept as it is),
``answer_number`` = the final number after ``####`` with thousands separators removed (a string such as
``"72"``, ``"-3"`` or ``"0.5"``: compare strings, or parse with ``float``), ``source`` = ``"gsm8k"``,
``id`` = ``"gsm8k-<split>-<row>"``.
"""

from __future__ import annotations

import re
from pathlib import Path

from uqlora.data.sources.common import (
    GENERATION,
    DatasetInfo,
    Entry,
    Record,
    Source,
    gen_record,
    hub_simple,
    one_line,
    read_jsonl,
)
from uqlora.errors import DataError

SOURCE = "gsm8k"
_FINAL = re.compile(r"####\s*(\S[^\n]*?)\s*$")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


def answer_number(answer: str) -> str:
    """The final number of a GSM8K worked answer: the text after its last ``####``, without thousands
    separators (``"... #### 1,234"`` -> ``"1234"``). Raises :class:`DataError` when the answer has no
    ``#### <number>`` line."""
    match = _FINAL.search(answer)
    number = match.group(1).replace(",", "") if match else ""
    if not _NUMBER.fullmatch(number):
        raise DataError(f"GSM8K answer has no final '#### <number>' line: {one_line(answer, 120)!r}")
    return number


def record(rid: str, question: str, answer: str) -> Record:
    rec = gen_record(rid, str(question), str(answer), SOURCE)
    try:
        rec["answer_number"] = answer_number(rec["response"])
    except DataError as exc:
        raise DataError(f"GSM8K question {rid}: {exc}") from None
    return rec


def read_local(path: Path, split: str, options, name: str) -> list[Record]:
    return [record(f"{SOURCE}-{split}-{i}", r["question"], r["answer"]) for i, r in enumerate(read_jsonl(path))]


def hub_row(row, split: str, i: int) -> Record:
    return record(f"{SOURCE}-{split}-{i}", row["question"], row["answer"])


ENTRIES = (
    Entry(
        DatasetInfo(
            name="gsm8k",
            task=GENERATION,
            num_classes=0,
            label_names=None,
            hub_id="openai/gsm8k",
            hub_config="main",
            local_dir="gsm8k",
            splits={
                "train": "official train (7473); hub main train",
                "test": "official test (1319); hub main test",
            },
            description="GSM8K: grade-school math word problems; response = the worked answer, "
            "answer_number = its final number. No validation split.",
        ),
        Source(
            local_files={"train": "train.jsonl", "test": "test.jsonl"},
            read_local=read_local,
            hub_splits={"train": "train", "test": "test"},
            read_hub=hub_simple(hub_row),
        ),
    ),
)
