"""TweetEval binary tasks: ``tweeteval_hate`` and ``tweeteval_offensive``.

Local ``tweeteval_{hate,offensive}/{train,val,test}_text.txt`` + ``..._labels.txt`` (line-aligned;
class names from ``mapping.txt``) -> train / validation / test; hub ``cardiffnlp/tweet_eval``
``hate`` / ``offensive`` train / validation / test.
"""

from __future__ import annotations

from pathlib import Path

from uqlora.data.sources.common import (
    CLASSIFICATION,
    DatasetInfo,
    Entry,
    Record,
    Source,
    cls_record,
    hub_simple,
    hub_text_label_row,
    read_lines,
    require_file,
)
from uqlora.errors import DataError

_FILE_STEM = {"train": "train", "validation": "val", "test": "test"}


def read_local(path: Path, split: str, options, name: str) -> list[Record]:
    stem = _FILE_STEM[split]
    text_file = require_file(path / f"{stem}_text.txt", name)
    label_file = require_file(path / f"{stem}_labels.txt", name)
    texts, labels = read_lines(text_file), read_lines(label_file)
    if len(texts) != len(labels):
        raise DataError(
            f"dataset '{name}': {text_file} has {len(texts)} lines but {label_file} has "
            f"{len(labels)}"
        )
    return [cls_record(f"{split}-{i}", t.strip(), int(l)) for i, (t, l) in enumerate(zip(texts, labels))]


def _entry(name: str, config: str, n: tuple[int, int, int], labels: tuple[str, str]) -> Entry:
    info = DatasetInfo(
        name=name,
        task=CLASSIFICATION,
        num_classes=2,
        label_names=labels,
        hub_id="cardiffnlp/tweet_eval",
        hub_config=config,
        local_dir=f"tweeteval_{config}",
        splits={
            "train": f"official train ({n[0]}); hub train",
            "validation": f"official val ({n[1]}); hub validation",
            "test": f"official test ({n[2]}); hub test",
        },
        description=f"TweetEval {config} detection: binary tweet classification "
        f"({labels[0]} / {labels[1]}, names from mapping.txt).",
    )
    source = Source(
        local_files={"train": ".", "validation": ".", "test": "."},
        read_local=read_local,
        hub_splits={"train": "train", "validation": "validation", "test": "test"},
        read_hub=hub_simple(hub_text_label_row),
    )
    return Entry(info, source)


ENTRIES = (
    _entry("tweeteval_hate", "hate", (9000, 1000, 2970), ("not-hate", "hate")),
    _entry("tweeteval_offensive", "offensive", (11916, 1324, 860), ("not-offensive", "offensive")),
)
