"""User files as datasets: ``custom_classification`` and ``custom_multiple_choice``.

``options["files"]`` maps splits (train / validation / test) to csv, tsv (with a header) or jsonl /
json files; a relative path is looked up under the data dir first, then the working directory.

* ``custom_classification``: ``text_column`` ("text"), ``text_pair_column`` (None),
  ``label_column`` ("label"), ``label_names`` (string labels are mapped through it; integers are used
  as they are), ``num_classes``.
* ``custom_multiple_choice``: ``question_column`` ("question"), either ``choices_column`` (a
  list-valued field; in csv/tsv a JSON list; default "choices") or ``choice_columns`` (one column per
  choice), ``label_column`` ("label"; an integer index or a letter A-Z), ``num_classes``.
* both: ``id_column`` (default "id" when the file has it, else ``"<split>-<row>"``);
  ``uncertainty_column`` (None): a per-example uncertainty in [0, 1] kept as the record's
  ``uncertainty`` (read by ``method=ual`` with ``method.uncertainty_source=column``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from uqlora.data.sources.common import (
    CLASSIFICATION,
    MULTIPLE_CHOICE,
    DatasetInfo,
    Entry,
    Record,
    choices_list,
    cls_record,
    letters,
    read_json_list,
    read_jsonl,
)
from uqlora.errors import DataError

CLS = "custom_classification"
MC = "custom_multiple_choice"
SPLIT_NAMES = ("train", "validation", "test")
TABLE_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")
OPTIONS: dict[str, tuple[str, ...]] = {
    CLS: ("files", "text_column", "text_pair_column", "label_column", "label_names",
          "num_classes", "id_column", "uncertainty_column"),
    MC: ("files", "question_column", "choices_column", "choice_columns", "label_column",
         "num_classes", "id_column", "uncertainty_column"),
}  # fmt: skip


def _info(name: str, task: str, description: str) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        task=task,
        num_classes=0,
        label_names=None,
        hub_id="",
        hub_config=None,
        local_dir="",
        splits={s: "user file from options.files[split]" for s in SPLIT_NAMES},
        description=description,
    )


ENTRIES = (
    Entry(_info(CLS, CLASSIFICATION, "User-provided classification data (csv, tsv or jsonl); "
                "num_classes and label_names come from the options."), None),
    Entry(_info(MC, MULTIPLE_CHOICE, "User-provided multiple-choice data (csv, tsv or jsonl); "
                "num_classes is the maximum number of choices."), None),
)  # fmt: skip


# --------------------------------------------------------------------------- files and tables


def files_of(name: str, options: Mapping[str, Any]) -> dict[str, str]:
    """``options["files"]`` checked: split -> path, in train / validation / test order."""
    files = options.get("files")
    if not files or not isinstance(files, Mapping):
        raise DataError(
            f"dataset '{name}': option files must map splits ({', '.join(SPLIT_NAMES)}) to "
            f"csv/tsv/jsonl paths, got {files!r}"
        )
    bad = [s for s in files if s not in SPLIT_NAMES]
    if bad:
        raise DataError(
            f"dataset '{name}': unknown split(s) {', '.join(map(str, bad))} in files; valid "
            f"splits: {', '.join(SPLIT_NAMES)}"
        )
    return {s: str(files[s]) for s in SPLIT_NAMES if s in files}


def _resolve_user_file(path: str, data_dir: str | Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and data_dir is not None and (Path(data_dir) / p).exists():
        return Path(data_dir) / p
    return p


@dataclass(frozen=True)
class _Table:
    """The rows (dicts) and column names of one user file."""

    path: Path
    rows: list[dict[str, Any]]
    columns: list[str]

    def column(self, column: str, option: str) -> str:
        """``column`` if the file has it, else a DataError naming ``option`` and the columns."""
        if column not in self.columns:
            raise DataError(
                f"column '{column}' ({option}) not found in {self.path}; available columns: "
                f"{choices_list(self.columns)}"
            )
        return column


def _read_delimited(path: Path, delimiter: str) -> _Table:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    return _Table(path, rows, columns)


def _json_table(path: Path, rows: list[Any]) -> _Table:
    columns: list[str] = []
    for row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: every line must be a JSON object")
        columns.extend(k for k in row if k not in columns)
    return _Table(path, rows, columns)


def _read_table(path: Path, name: str) -> _Table:
    """A csv / tsv (with header) or jsonl / json file as a :class:`_Table`."""
    if not path.is_file():
        raise DataError(f"dataset '{name}': file {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".jsonl":
        return _json_table(path, read_jsonl(path))
    if suffix == ".json":
        return _json_table(path, read_json_list(path))
    raise DataError(
        f"dataset '{name}': unsupported file type '{suffix}' of {path}; supported: "
        f"{', '.join(TABLE_EXTENSIONS)}"
    )


# --------------------------------------------------------------------------- values


def _integral(value: Any) -> int | None:
    """``value`` as an int when it is an int or an integral float (not bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _class_label(value: Any, label_names: list[str] | None, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    number = _integral(value)
    if number is not None:
        return number
    text = str(value).strip()
    if label_names and text in label_names:
        return label_names.index(text)
    try:
        return int(text)
    except ValueError:
        valid = f"one of {choices_list(label_names)}" if label_names else "an integer"
        raise DataError(f"{where}: label {value!r} is not {valid} (set label_names)") from None


def _class_label_in_range(value: Any, label_names, num_classes, where: str) -> int:
    """:func:`_class_label`, checked to lie in ``0 .. num_classes - 1`` (``>= 0`` when unknown)."""
    label = _class_label(value, label_names, where)
    if label < 0 or (num_classes is not None and label >= int(num_classes)):
        top = int(num_classes) - 1 if num_classes is not None else "?"
        raise DataError(f"{where}: label {label} outside 0..{top}")
    return label


def _choice_label(value: Any, n_choices: int, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is not a choice index or letter")
    number = _integral(value)
    if number is not None:
        return number
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if len(text) == 1 and "A" <= text.upper() <= "Z":
        return ord(text.upper()) - ord("A")
    raise DataError(
        f"{where}: label {value!r} is not a choice index (0-{n_choices - 1}) or letter "
        f"({', '.join(letters(n_choices))})"
    )


def _unit_interval(value: Any, where: str) -> float:
    try:
        u = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: uncertainty {value!r} is not a number in [0, 1]") from None
    if not 0.0 <= u <= 1.0:  # also rejects NaN
        raise DataError(f"{where}: uncertainty {u} is outside [0, 1]")
    return u


def _label_names(options: Mapping[str, Any]) -> list[str] | None:
    names = options.get("label_names")
    return [str(x) for x in names] if names else None


# --------------------------------------------------------------------------- records

RowId = Callable[[int, Mapping[str, Any]], str]


def _row_ids(split: str, id_column: str | None) -> RowId:
    """Record id of row ``i``: its ``id_column`` value when set and non-empty, else ``<split>-<i>``."""

    def rid(i: int, row: Mapping[str, Any]) -> str:
        value = row.get(id_column) if id_column else None
        return str(value) if value not in (None, "") else f"{split}-{i}"

    return rid


def _classification_records(
    table: _Table, options: Mapping[str, Any], rid: RowId, label_column: str
) -> list[Record]:
    text_column = table.column(options.get("text_column", "text"), "text_column")
    pair_option = options.get("text_pair_column")
    pair_column = table.column(pair_option, "text_pair_column") if pair_option else None
    label_names = _label_names(options)
    num_classes = options.get("num_classes")
    if num_classes is None and label_names:
        num_classes = len(label_names)
    out = []
    for i, row in enumerate(table.rows):
        where = f"{table.path}: row {i}"
        label = _class_label_in_range(row.get(label_column), label_names, num_classes, where)
        pair = row.get(pair_column) if pair_column else None
        out.append(cls_record(rid(i, row), str(row.get(text_column) or ""), label,
                              text_pair=None if pair is None else str(pair)))  # fmt: skip
    return out


def _choices_from_columns(columns: list[str]) -> Callable[[Mapping[str, Any], str], list[str]]:
    def read(row: Mapping[str, Any], where: str) -> list[str]:
        values = (row.get(c) for c in columns)
        return [str(v) for v in values if v not in (None, "")]

    return read


def _choices_from_list(column: str) -> Callable[[Mapping[str, Any], str], list[str]]:
    def read(row: Mapping[str, Any], where: str) -> list[str]:
        choices = row.get(column)
        if isinstance(choices, str):
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                raise DataError(f"{where}: {column} is not a JSON list") from None
        if not isinstance(choices, list):
            raise DataError(f"{where}: {column} must be a list, got {type(choices).__name__}")
        return [str(c) for c in choices]

    return read


def _choice_reader(table: _Table, options: Mapping[str, Any]):
    """How to read a row's choices: one column per choice, or one list-valued column."""
    choice_columns = options.get("choice_columns")
    choices_column = options.get("choices_column")
    if choice_columns and choices_column:
        raise DataError(f"dataset '{MC}': give either choices_column or choice_columns, not both")
    if choice_columns:
        return _choices_from_columns([table.column(c, "choice_columns") for c in choice_columns])
    return _choices_from_list(table.column(choices_column or "choices", "choices_column"))


def _mc_records(
    table: _Table, options: Mapping[str, Any], rid: RowId, label_column: str
) -> list[Record]:
    question_column = table.column(options.get("question_column", "question"), "question_column")
    read_choices = _choice_reader(table, options)
    out = []
    for i, row in enumerate(table.rows):
        where = f"{table.path}: row {i}"
        choices = read_choices(row, where)
        if not choices:
            raise DataError(f"{where}: no choices")
        label = _choice_label(row.get(label_column), len(choices), where)
        if not 0 <= label < len(choices):
            raise DataError(f"{where}: label {label} outside 0..{len(choices) - 1}")
        out.append({"id": rid(i, row), "question": str(row.get(question_column) or ""),
                    "choices": choices, "label": label, "choice_labels": letters(len(choices))})  # fmt: skip
    return out


def _attach_uncertainty(records: list[Record], table: _Table, split: str, options) -> None:
    """Copy ``uncertainty_column`` into the records (required for train, optional elsewhere)."""
    u_column = options.get("uncertainty_column")
    if not u_column or (split != "train" and u_column not in table.columns):
        return  # only training needs it
    table.column(u_column, "uncertainty_column")
    for i, (rec, row) in enumerate(zip(records, table.rows)):
        where = f"{table.path}: row {i}, column '{u_column}'"
        rec["uncertainty"] = _unit_interval(row.get(u_column), where)


def load(name: str, split: str, data_dir: str | Path | None, options: Mapping[str, Any]) -> list[Record]:
    """Records of ``split`` read from the user's file (see the module docstring)."""
    files = files_of(name, options)
    if split not in files:
        raise DataError(
            f"dataset '{name}' has no split '{split}' in options.files; valid splits: "
            f"{choices_list(list(files))}"
        )
    table = _read_table(_resolve_user_file(files[split], data_dir), name)
    id_column = options.get("id_column")
    if id_column is not None:
        table.column(id_column, "id_column")
    elif "id" in table.columns:
        id_column = "id"
    label_column = table.column(options.get("label_column", "label"), "label_column")
    build = _classification_records if name == CLS else _mc_records
    out = build(table, options, _row_ids(split, id_column), label_column)
    _attach_uncertainty(out, table, split, options)
    return out


# --------------------------------------------------------------------------- info


def _declared_num_classes(name: str, options: Mapping[str, Any], label_names) -> int | None:
    num_classes = options.get("num_classes")
    if num_classes is None and name == CLS and label_names:
        num_classes = len(label_names)
    if num_classes is None and name == MC and options.get("choice_columns"):
        num_classes = len(options["choice_columns"])
    return num_classes


def _inferred_num_classes(name: str, options: Mapping[str, Any]) -> int:
    """The largest label + 1 (classification) or the most choices, over every given file."""
    records = [r for s in files_of(name, options) for r in load(name, s, None, options)]
    if name == CLS:
        return max((r["label"] for r in records), default=-1) + 1
    return max((len(r["choices"]) for r in records), default=0)


def resolve_info(info: DatasetInfo, options: Mapping[str, Any]) -> DatasetInfo:
    """``info`` with ``num_classes`` and ``label_names`` from the options: ``num_classes``, else
    ``len(label_names)``, else ``len(choice_columns)`` for multiple choice, else inferred from the
    user's files (the largest label + 1, or the largest number of choices)."""
    names = _label_names(options)
    label_names = tuple(names) if names else None
    num_classes = _declared_num_classes(info.name, options, label_names)
    if num_classes is None and options.get("files"):
        num_classes = _inferred_num_classes(info.name, options)
    return replace(
        info,
        num_classes=int(num_classes or 0),
        label_names=label_names if info.name == CLS else None,
    )
