"""GLUE single-sentence tasks: ``sst2`` (binary sentiment) and ``cola`` (acceptability).

* ``sst2``: local ``sst2/train.tsv`` (67349) / ``dev.tsv`` (872) / ``test_labeled.tsv`` (1821, a
  labelled SST-2 test copy with CRLF line ends), tsv with header ``sentence<TAB>label`` -> train /
  validation / test; hub ``stanfordnlp/sst2`` train / validation (the hub test split is unlabelled,
  so no test online).
* ``cola``: local ``cola/train.tsv`` (8551) -> train, in-domain ``dev.tsv`` (1043) -> test,
  ``out_of_domain_dev.tsv`` (516) -> test_ood (local only); headerless tsv (source, label, original
  mark, sentence); hub ``nyu-mll/glue`` ``cola`` train, validation -> test. No validation split.
"""

from __future__ import annotations

from pathlib import Path

from uqlora.data.sources.common import (
    CLASSIFICATION,
    DatasetInfo,
    Entry,
    Record,
    Source,
    bad_row,
    choices_list,
    cls_record,
    hub_simple,
    read_tsv,
)
from uqlora.errors import DataError


def read_local_sst2(path: Path, split: str, options, name: str) -> list[Record]:
    rows = read_tsv(path)
    header = rows[0] if rows else []
    for col in ("sentence", "label"):
        if col not in header:
            raise DataError(
                f"{path}: column '{col}' not found; available columns: {choices_list(header)}"
            )
    si, li = header.index("sentence"), header.index("label")
    out = []
    for i, row in enumerate(rows[1:]):
        out.append(cls_record(f"{split}-{i}", row[si].strip(), int(row[li])))
    return out


def read_local_cola(path: Path, split: str, options, name: str) -> list[Record]:
    out = []
    for i, row in enumerate(read_tsv(path)):
        if len(row) != 4:
            raise bad_row(path, i, f"expected 4 tab-separated fields, got {len(row)}")
        out.append(cls_record(f"{split}-{i}", row[3].strip(), int(row[1])))
    return out


def hub_sentence_label_row(row, split: str, i: int) -> Record:
    return cls_record(f"{split}-{i}", str(row["sentence"]).strip(), int(row["label"]))


SST2 = Entry(
    DatasetInfo(
        name="sst2",
        task=CLASSIFICATION,
        num_classes=2,
        label_names=("negative", "positive"),
        hub_id="stanfordnlp/sst2",
        hub_config=None,
        local_dir="sst2",
        splits={
            "train": "GLUE train (67349); hub train",
            "validation": "GLUE dev (872); hub validation",
            "test": "local: labelled SST-2 test copy test_labeled.tsv (1821); not "
            "available from the hub (GLUE test labels are hidden)",
        },
        description="SST-2: binary sentiment of movie-review phrases.",
    ),
    Source(
        local_files={"train": "train.tsv", "validation": "dev.tsv", "test": "test_labeled.tsv"},
        read_local=read_local_sst2,
        hub_splits={"train": "train", "validation": "validation"},
        read_hub=hub_simple(hub_sentence_label_row),
    ),
)

COLA = Entry(
    DatasetInfo(
        name="cola",
        task=CLASSIFICATION,
        num_classes=2,
        label_names=("unacceptable", "acceptable"),
        hub_id="nyu-mll/glue",
        hub_config="cola",
        local_dir="cola",
        splits={
            "train": "GLUE train (8551); hub train",
            "test": "GLUE in-domain dev (1043; GLUE test labels are hidden); hub validation",
            "test_ood": "local only: out-of-domain dev (516)",
        },
        description="CoLA: grammatical acceptability of English sentences. No "
        "validation split.",
    ),
    Source(
        local_files={"train": "train.tsv", "test": "dev.tsv", "test_ood": "out_of_domain_dev.tsv"},
        read_local=read_local_cola,
        hub_splits={"train": "train", "test": "validation"},
        read_hub=hub_simple(hub_sentence_label_row),
    ),
)

ENTRIES = (SST2, COLA)
