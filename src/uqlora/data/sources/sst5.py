"""SST-5 (``sst5``): fine-grained (5-class) sentiment of movie-review sentences.

Local ``sst5/stsa.fine.train`` (8544) / ``.dev`` (1101) / ``.test`` (2210), one ``<label> <sentence>``
per line -> train / validation / test; hub ``SetFit/sst5`` train / validation / test.
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
    cls_record,
    hub_simple,
    hub_text_label_row,
    one_line,
    read_lines,
)

CLASSES: tuple[str, ...] = (
    "very negative", "negative", "neutral", "positive", "very positive",
)  # fmt: skip


def read_local(path: Path, split: str, options, name: str) -> list[Record]:
    out = []
    for i, line in enumerate(read_lines(path)):
        label, _, text = line.partition(" ")
        if not label.isdigit():
            raise bad_row(path, i, f"expected '<label> <sentence>', got {one_line(line, 80)!r}")
        out.append(cls_record(f"{split}-{i}", text.strip(), int(label)))
    return out


ENTRIES = (
    Entry(
        DatasetInfo(
            name="sst5",
            task=CLASSIFICATION,
            num_classes=5,
            label_names=CLASSES,
            hub_id="SetFit/sst5",
            hub_config=None,
            local_dir="sst5",
            splits={
                "train": "stsa.fine.train (8544); hub train",
                "validation": "stsa.fine.dev (1101); hub validation",
                "test": "stsa.fine.test (2210); hub test",
            },
            description="SST-5: fine-grained (5-class) sentiment of movie-review sentences.",
        ),
        Source(
            local_files={"train": "stsa.fine.train", "validation": "stsa.fine.dev",
                         "test": "stsa.fine.test"},  # fmt: skip
            read_local=read_local,
            hub_splits={"train": "train", "validation": "validation", "test": "test"},
            read_hub=hub_simple(hub_text_label_row),
        ),
    ),
)
