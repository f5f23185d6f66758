"""CommonsenseQA (``cqa``): commonsense questions with 5 choices A-E.

Locally only a 25-row training sample (``commonsenseqa_sample/train_sample.jsonl``, official jsonl:
``id``, ``question.stem``, ``question.choices``, ``answerKey``) -> train; hub ``tau/commonsense_qa``
train, validation -> test (the official test set is unlabelled).
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
        out.append(mc_record(str(row["id"]), q["stem"], [c["text"] for c in q["choices"]],
                             [c["label"] for c in q["choices"]], row["answerKey"]))  # fmt: skip
    return out


def hub_row(row, split: str, i: int) -> Record:
    ch = row["choices"]
    return mc_record(str(row["id"]), row["question"], list(ch["text"]),
                     [str(x) for x in ch["label"]], row["answerKey"])  # fmt: skip


ENTRIES = (
    Entry(
        DatasetInfo(
            name="cqa",
            task=MULTIPLE_CHOICE,
            num_classes=5,
            label_names=None,
            hub_id="tau/commonsense_qa",
            hub_config=None,
            local_dir="commonsenseqa_sample",
            splits={
                "train": "local: the first 25 official training rows (train_sample.jsonl); "
                "hub: train (9741)",
                "test": "hub: validation (1221; the official test set is unlabelled); "
                "not available locally",
            },
            description="CommonsenseQA: commonsense questions with 5 choices A-E. Only a "
            "25-row training sample is stored locally.",
        ),
        Source(
            local_files={"train": "train_sample.jsonl"},
            read_local=read_local,
            hub_splits={"train": "train", "test": "validation"},
            read_hub=hub_simple(hub_row),
        ),
    ),
)
