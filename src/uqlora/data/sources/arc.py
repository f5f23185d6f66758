"""ARC (AI2 Reasoning Challenge): ``arc_e`` (Easy) and ``arc_c`` (Challenge).

Local ``arc/ARC-{Easy,Challenge}/*-Train/Dev/Test.jsonl`` (official jsonl: ``question.stem``,
``question.choices[{label, text}]``, ``answerKey``) -> train / validation / test; hub
``allenai/ai2_arc`` train / validation / test. Questions have 3, 4 or 5 choices labelled A-E or 1-4,
so ``num_classes`` is 5 (the most choices).
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
    mc_record,
    read_jsonl,
)


def read_local(path: Path, split: str, options, name: str) -> list[Record]:
    out = []
    for row in read_jsonl(path):
        q = row["question"]
        out.append(
            mc_record(
                str(row["id"]),
                q["stem"],
                [c["text"] for c in q["choices"]],
                [str(c["label"]) for c in q["choices"]],
                row["answerKey"],
            )
        )
    return out


def hub_row(row, split: str, i: int) -> Record:
    ch = row["choices"]
    return mc_record(str(row["id"]), row["question"], list(ch["text"]),
                     [str(x) for x in ch["label"]], row["answerKey"])  # fmt: skip


def _entry(name: str, config: str, n: tuple[int, int, int], n_choices: str) -> Entry:
    info = DatasetInfo(
        name=name,
        task=MULTIPLE_CHOICE,
        num_classes=5,
        label_names=None,
        hub_id="allenai/ai2_arc",
        hub_config=config,
        local_dir=f"arc/{config}",
        splits={
            "train": f"official train ({n[0]}); hub train",
            "validation": f"official dev ({n[1]}); hub validation",
            "test": f"official test ({n[2]}); hub test",
        },
        description=f"AI2 Reasoning Challenge, {config.split('-')[1]} set: grade-school science "
        f"questions with {n_choices} choices (labels A-E or 1-4).",
    )
    source = Source(
        local_files={"train": f"{config}-Train.jsonl", "validation": f"{config}-Dev.jsonl",
                     "test": f"{config}-Test.jsonl"},  # fmt: skip
        read_local=read_local,
        hub_splits={"train": "train", "validation": "validation", "test": "test"},
        read_hub=hub_simple(hub_row),
    )
    return Entry(info, source)


ENTRIES = (
    _entry("arc_e", "ARC-Easy", (2251, 570, 2376), "4 (a few with 3 or 5)"),
    _entry("arc_c", "ARC-Challenge", (1119, 299, 1172), "4 (a few with 3 or 5)"),
)
