"""20 Newsgroups, bydate (``20ng``): 20-way topic classification of full messages.

Local ``20newsgroups/train.jsonl`` (11314) / ``test.jsonl`` (7532) (``id`` "<group>/<file>", ``text``,
``label`` "<group>") -> train / test; hub ``SetFit/20_newsgroups`` train / test. The label of a message
is the index of its group in the sorted group names (:data:`GROUPS`). No validation split.
"""

from __future__ import annotations

from pathlib import Path

from uqlora.data.sources.common import (
    CLASSIFICATION,
    DatasetInfo,
    Entry,
    Record,
    Source,
    choices_list,
    cls_record,
    hub_simple,
    read_jsonl,
)
from uqlora.errors import DataError

# The 20 newsgroups, sorted: the label of a message is the index of its group here.
GROUPS: tuple[str, ...] = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos",
    "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey", "sci.crypt",
    "sci.electronics", "sci.med", "sci.space", "soc.religion.christian",
    "talk.politics.guns", "talk.politics.mideast", "talk.politics.misc",
    "talk.religion.misc",
)  # fmt: skip


def group_label(group: str, where: str) -> int:
    if group not in GROUPS:
        raise DataError(f"{where}: unknown newsgroup '{group}'; valid: {choices_list(GROUPS)}")
    return GROUPS.index(group)


def read_local(path: Path, split: str, options, name: str) -> list[Record]:
    return [
        cls_record(str(r["id"]), r["text"], group_label(r["label"], str(path)))
        for r in read_jsonl(path)
    ]


def hub_row(row, split: str, i: int) -> Record:
    label_text = row.get("label_text")
    label = group_label(label_text, "SetFit/20_newsgroups") if label_text else row["label"]
    return cls_record(f"{split}-{i}", row["text"], int(label))


ENTRIES = (
    Entry(
        DatasetInfo(
            name="20ng",
            task=CLASSIFICATION,
            num_classes=20,
            label_names=GROUPS,
            hub_id="SetFit/20_newsgroups",
            hub_config=None,
            local_dir="20newsgroups",
            splits={
                "train": "bydate train (11314); hub train",
                "test": "bydate test (7532); hub test",
            },
            description="20 Newsgroups (bydate): 20-way topic classification of full "
            "messages (headers kept locally; the hub copy may strip them); label = index "
            "of the group in the sorted group names. No validation split.",
        ),
        Source(
            local_files={"train": "train.jsonl", "test": "test.jsonl"},
            read_local=read_local,
            hub_splits={"train": "train", "test": "test"},
            read_hub=hub_simple(hub_row),
        ),
    ),
)
