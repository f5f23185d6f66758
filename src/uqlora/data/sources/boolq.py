"""BoolQ (``boolq``): yes/no questions about a Wikipedia passage.

Only the official validation file (``boolq/val.jsonl``, 3270 rows: ``question``, ``passage``, ``idx``,
``label`` true/false) is stored locally, so it is carved into train (2616) / test (654) with a fixed
seed: ``numpy.random.default_rng(0).permutation(3270)``, the first 20 % (654) of the permuted indices
are the test set, the rest the training set; both keep the file order. Online: hub ``google/boolq``
train, validation -> test. Records: ``text`` = question, ``text_pair`` = passage,
``label`` = int(answer is true). No validation split.
"""

from __future__ import annotations

from pathlib import Path

from uqlora.data.sources.common import (
    CLASSIFICATION,
    DatasetInfo,
    Entry,
    Record,
    Source,
    carve_indices,
    cls_record,
    hub_simple,
    read_jsonl,
)
from uqlora.errors import DataError

TEST_FRACTION = 0.2
SEED = 0


def as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise DataError(f"BoolQ label {value!r} is not true/false")


def carve(n: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, test) row indices of the local BoolQ file, in file order."""
    return carve_indices(n, TEST_FRACTION, SEED)


def read_local(path: Path, split: str, options, name: str) -> list[Record]:
    rows = read_jsonl(path)
    train_idx, test_idx = carve(len(rows))
    out = []
    for i in train_idx if split == "train" else test_idx:
        r = rows[i]
        rid = f"val-{r.get('idx', i)}"
        out.append(cls_record(rid, r["question"], int(as_bool(r["label"])), text_pair=r["passage"]))
    return out


def hub_row(row, split: str, i: int) -> Record:
    return cls_record(f"{split}-{i}", row["question"], int(as_bool(row["answer"])),
                      text_pair=row["passage"])  # fmt: skip


ENTRIES = (
    Entry(
        DatasetInfo(
            name="boolq",
            task=CLASSIFICATION,
            num_classes=2,
            label_names=("no", "yes"),
            hub_id="google/boolq",
            hub_config=None,
            local_dir="boolq",
            splits={
                "train": "local: official validation (val.jsonl, 3270) minus the test carve "
                "(2616; numpy default_rng(0) permutation, the last 80%); hub: train (9427)",
                "test": "local: 20% carve of val.jsonl (654; the first 654 indices of "
                "default_rng(0).permutation(3270)); hub: validation (3270)",
            },
            description="BoolQ: yes/no questions about a Wikipedia passage; text = "
            "question, text_pair = passage, label = int(answer is true). No validation split.",
        ),
        Source(
            local_files={"train": "val.jsonl", "test": "val.jsonl"},
            read_local=read_local,
            hub_splits={"train": "train", "test": "validation"},
            read_hub=hub_simple(hub_row),
        ),
    ),
)
