"""AG News (``agnews``): 4-class news topic classification.

Local ``agnews/train_subset_10k.tsv`` (10001 rows: description, class name in ``classes.txt`` order;
no titles) -> train, ``test.csv`` (7600: ``"class 1-4","title","description"``) -> test; hub
``fancyzhx/ag_news`` train (the full 120k) / test. No validation split. Option ``include_title``
(default ``True``): test text is ``title + " " + description`` (the hub's ``text`` field has the same
form); with ``False`` only the description, like the local training subset.
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
    hub_text_label_row,
    read_csv,
    read_lines,
    read_tsv,
    require_file,
)
from uqlora.errors import DataError

CLASSES: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")


def read_classes(folder: Path, name: str) -> list[str]:
    """The class names of ``classes.txt``, checked against :data:`CLASSES`."""
    classes = [c.strip() for c in read_lines(require_file(folder / "classes.txt", name))]
    classes = [c for c in classes if c]
    if tuple(classes) != CLASSES:
        raise DataError(
            f"{folder / 'classes.txt'}: classes {choices_list(classes)} differ from the expected "
            f"{choices_list(CLASSES)}"
        )
    return classes


def _read_train(path: Path, split: str, classes: list[str]) -> list[Record]:
    out = []
    for i, row in enumerate(read_tsv(path, quoted=True)):
        if len(row) != 2 or row[1] not in classes:
            raise bad_row(path, i, f"expected '<description><TAB><class in {classes}>'")
        out.append(cls_record(f"{split}-{i}", row[0].strip(), classes.index(row[1])))
    return out


def _read_test(path: Path, split: str, include_title: bool) -> list[Record]:
    out = []
    for i, row in enumerate(read_csv(path)):
        if len(row) != 3 or row[0] not in ("1", "2", "3", "4"):
            raise bad_row(path, i, "expected '<class 1-4>,<title>,<description>'")
        title, desc = row[1].strip(), row[2].strip()
        text = f"{title} {desc}" if include_title and title else desc
        out.append(cls_record(f"{split}-{i}", text, int(row[0]) - 1))
    return out


def read_local(path: Path, split: str, options, name: str) -> list[Record]:
    classes = read_classes(path.parent, name)
    if split == "train":
        return _read_train(path, split, classes)
    return _read_test(path, split, bool(options.get("include_title", True)))


ENTRIES = (
    Entry(
        DatasetInfo(
            name="agnews",
            task=CLASSIFICATION,
            num_classes=4,
            label_names=CLASSES,
            hub_id="fancyzhx/ag_news",
            hub_config=None,
            local_dir="agnews",
            splits={
                "train": "local: train_subset_10k.tsv (10001 rows, descriptions only, class "
                "by name in classes.txt order); hub: full train (120000, title + description)",
                "test": "official test.csv (7600; class 1-4 -> 0-3; text = title + ' ' + "
                "description, or description only with include_title=False); hub test",
            },
            description="AG News: 4-class news topic classification. No validation split.",
        ),
        Source(
            local_files={"train": "train_subset_10k.tsv", "test": "test.csv"},
            read_local=read_local,
            hub_splits={"train": "train", "test": "test"},
            read_hub=hub_simple(hub_text_label_row),
            options=("include_title",),
        ),
    ),
)
