"""Tests of the dataset adapters (``uqlora.data.datasets``).

The local-data tests read the real copies under ``default_data_dir()`` (normally
``/work/shared/data``) and are skipped when that folder does not exist. The error,
custom-dataset and hub-mapping tests need no data (the hub is replaced by a fake
``datasets`` module, so nothing touches the network).
"""

from __future__ import annotations

import csv
import json
import sys
import time
import types
from pathlib import Path

import pytest

from uqlora.data import datasets as ds
from uqlora.errors import DataError

# Documented row counts (shared/data/README.md), per dataset and split.
EXPECTED_COUNTS = {
    "arc_e": {"train": 2251, "validation": 570, "test": 2376},
    "arc_c": {"train": 1119, "validation": 299, "test": 1172},
    "obqa": {"train": 4957, "validation": 500, "test": 500},
    "wg_s": {"train": 640, "test": 1267},
    "wg_m": {"train": 2558, "test": 1267},
    "boolq": {"train": 2616, "test": 654},
    "cqa": {"train": 25},
    "mmlu": {"train": 285, "validation": 1531, "test": 14042},
    "sst2": {"train": 67349, "validation": 872, "test": 1821},
    "sst5": {"train": 8544, "validation": 1101, "test": 2210},
    "cola": {"train": 8551, "test": 1043, "test_ood": 516},
    # The README says 10000, but train_subset_10k.tsv holds 10001 labelled rows (no header).
    "agnews": {"train": 10001, "test": 7600},
    "20ng": {"train": 11314, "test": 7532},
    "tweeteval_hate": {"train": 9000, "validation": 1000, "test": 2970},
    "tweeteval_offensive": {"train": 11916, "validation": 1324, "test": 860},
}
BUILTIN = sorted(EXPECTED_COUNTS)
CASES = [(name, split) for name in BUILTIN for split in EXPECTED_COUNTS[name]]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = ds.default_data_dir()
    if not path.is_dir():
        pytest.skip(f"no local data at {path}")
    return path


@pytest.fixture(scope="module")
def loaded(data_dir):
    """Every local split, loaded once for the whole module."""
    return {(n, s): ds.load_split(n, s, data_dir) for n, s in CASES}


# --------------------------------------------------------------------------- registry


def test_registry_names():
    expected = {
        "arc_e", "arc_c", "obqa", "wg_s", "wg_m", "boolq", "cqa", "mmlu", "sst2", "sst5",
        "cola", "agnews", "20ng", "tweeteval_hate", "tweeteval_offensive",
        "custom_classification", "custom_multiple_choice", "gsm8k", "instruct", "instruct_mix",
    }  # fmt: skip
    assert set(ds.available_datasets()) == expected
    assert ds.available_datasets() == sorted(expected)
    for name in BUILTIN:
        info = ds.get_info(name)
        assert info.name == name
        assert info.task in (ds.CLASSIFICATION, ds.MULTIPLE_CHOICE)
        assert info.hub_id and info.local_dir and info.description
        # every local split is documented (cqa also documents its hub-only test split)
        assert set(EXPECTED_COUNTS[name]) <= set(info.splits)
        assert set(info.splits) <= {"train", "validation", "test", "test_ood"}
        if info.task == ds.CLASSIFICATION:
            assert info.label_names is not None and len(info.label_names) == info.num_classes
        else:
            assert info.label_names is None


def _family_entries():
    """(module name, entry) for every module of uqlora.data.sources that exposes ENTRIES."""
    import importlib
    import pkgutil

    import uqlora.data.sources as sources

    out = []
    for mod in pkgutil.iter_modules(sources.__path__):
        module = importlib.import_module(f"{sources.__name__}.{mod.name}")
        out.extend((mod.name, entry) for entry in getattr(module, "ENTRIES", ()))
    return out


def test_every_family_entry_is_registered_once_and_reachable_from_the_facade():
    """Each family module's ENTRIES reach ds.get_info / ds.available_datasets; no name is taken twice."""
    from uqlora.data import registry, sources

    entries = _family_entries()
    names = [entry.info.name for _, entry in entries]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert sorted(names) == ds.available_datasets()
    listed = {m.__name__.rsplit(".", 1)[1] for m in sources.FAMILIES}
    assert {module for module, _ in entries} == listed  # a family module missing from FAMILIES fails
    for _, entry in entries:
        assert ds.DATASETS[entry.info.name] is entry.info
        if entry.source is not None:  # custom datasets need files to resolve their info
            assert ds.get_info(entry.info.name) is entry.info
    dup = types.SimpleNamespace(__name__="dup", ENTRIES=(entries[0][1],))
    with pytest.raises(ValueError, match="registered twice"):
        registry.assemble([*sources.FAMILIES, dup])


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("UQLORA_DATA_DIR", str(tmp_path))
    assert ds.default_data_dir() == tmp_path


# --------------------------------------------------------------------------- local data


@pytest.mark.parametrize(("name", "split"), CASES)
def test_split_counts_and_records(loaded, name, split):
    records = loaded[(name, split)]
    info = ds.get_info(name)
    assert len(records) == EXPECTED_COUNTS[name][split]
    ids = [r["id"] for r in records]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == len(ids), "ids must be unique within a split"
    for r in records:
        assert type(r["label"]) is int
        assert 0 <= r["label"] < info.num_classes
    if info.task == ds.CLASSIFICATION:
        assert all(set(r) == {"id", "text", "text_pair", "label"} for r in records)
        empty = sum(1 for r in records if not r["text"].strip())
        assert empty <= max(1, len(records) // 1000), f"{empty} empty texts"
        if name == "boolq":
            assert all(r["text_pair"] for r in records)
        else:
            assert all(r["text_pair"] is None for r in records)
    else:
        for r in records:
            assert r["question"].strip()
            assert 2 <= len(r["choices"]) <= info.num_classes
            assert all(isinstance(c, str) and c.strip() for c in r["choices"])
            assert len(r["choice_labels"]) == len(r["choices"])
            assert r["label"] < len(r["choices"])
            if "cloze" in r:
                assert len(r["cloze"]) == len(r["choices"])


@pytest.mark.parametrize("name", BUILTIN)
def test_all_classes_in_train(loaded, name):
    info = ds.get_info(name)
    records = loaded[(name, "train")]
    labels = {r["label"] for r in records}
    if info.task == ds.CLASSIFICATION:
        assert labels == set(range(info.num_classes))
    else:  # every answer position that all questions have occurs
        common = min(len(r["choices"]) for r in records)
        assert set(range(common)) <= labels <= set(range(info.num_classes))


def test_available_splits_local(data_dir):
    assert ds.available_splits("wg_s", data_dir) == ["train", "test"]
    assert ds.available_splits("cqa", data_dir) == ["train"]
    assert ds.available_splits("cola", data_dir) == ["train", "test", "test_ood"]
    assert ds.available_splits("arc_e", data_dir) == ["train", "validation", "test"]


def test_arc_first_train_row(loaded, data_dir):
    raw = json.loads((data_dir / "arc/ARC-Easy/ARC-Easy-Train.jsonl").open().readline())
    rec = loaded[("arc_e", "train")][0]
    assert rec["id"] == raw["id"] == "Mercury_7220990"
    assert rec["question"] == raw["question"]["stem"]
    assert rec["choices"][rec["label"]] == "a bacterial population in the bloodstream"
    assert rec["choice_labels"][rec["label"]] == raw["answerKey"] == "B"


def test_arc_choice_counts_and_numeric_labels(loaded):
    records = loaded[("arc_e", "train")] + loaded[("arc_c", "test")]
    sizes = {len(r["choices"]) for r in records}
    assert sizes == {3, 4, 5}
    numeric = [r for r in records if r["choice_labels"][0] == "1"]
    assert numeric and all(r["choice_labels"][: 3] == ["1", "2", "3"] for r in numeric)


def test_obqa_parsing(loaded):
    rec = loaded[("obqa", "train")][0]
    assert rec["id"] == "7-980"
    assert rec["question"] == "The sun is responsible for"
    assert rec["choices"] == [
        "puppies learning new tricks", "children growing up and getting old",
        "flowers wilting in a vase", "plants sprouting, blooming and wilting",
    ]  # fmt: skip
    assert rec["label"] == 3 and rec["choice_labels"] == ["A", "B", "C", "D"]
    # The one row whose choices string repeats "(D)" keeps 4 choices.
    odd = next(r for r in loaded[("obqa", "train")] if r["id"] == "12-1145")
    assert len(odd["choices"]) == 4 and odd["label"] == 1
    assert all(len(r["choices"]) == 4 for s in ("train", "validation", "test")
               for r in loaded[("obqa", s)])  # fmt: skip


def test_winogrande_cloze(loaded, data_dir):
    raw = json.loads((data_dir / "winogrande/train_s.jsonl").open().readline())
    rec = loaded[("wg_s", "train")][0]
    assert rec["id"] == raw["qID"]
    assert rec["question"] == raw["sentence"]
    assert rec["choices"] == [raw["option1"], raw["option2"]]
    assert rec["label"] == int(raw["answer"]) - 1 == 1
    prefix = "Ian volunteered to eat Dennis's menudo after already having a bowl because "
    assert rec["cloze"] == [
        [prefix + "Ian", " despised eating intestine."],
        [prefix + "Dennis", " despised eating intestine."],
    ]
    # dev labels agree with the official labels file; S is a prefix of M
    labels = (data_dir / "winogrande/dev-labels.lst").read_text().split()
    assert [str(r["label"] + 1) for r in loaded[("wg_s", "test")]] == labels
    assert [r["id"] for r in loaded[("wg_m", "train")][:640]] == [
        r["id"] for r in loaded[("wg_s", "train")]
    ]


def test_sst2_first_row_and_crlf_test(loaded):
    rec = loaded[("sst2", "train")][0]
    assert rec == {"id": "train-0", "text": "hide new secretions from the parental units",
                   "text_pair": None, "label": 0}  # fmt: skip
    test = loaded[("sst2", "test")][0]
    assert test["text"] == "uneasy mishmash of styles and genres ." and test["label"] == 0
    assert not any(r["text"].endswith("\r") for r in loaded[("sst2", "test")])


def test_sst5_cola_agnews_rows(loaded, data_dir):
    assert loaded[("sst5", "train")][0]["label"] == 4
    assert loaded[("sst5", "train")][0]["text"].startswith("a stirring , funny")
    cola = loaded[("cola", "train")][0]
    assert cola["text"] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola["label"] == 1
    ag = loaded[("agnews", "test")][0]
    assert ag["label"] == 2  # "3" = Business
    assert ag["text"].startswith("Fears for T N pension after talks Unions representing")
    ag_train = loaded[("agnews", "train")][0]
    assert ag_train["label"] == 3 and ag_train["text"].startswith("p2pnet.net News:")
    # quoted tsv fields are unescaped ("" -> ")
    assert not any('""' in r["text"] for r in loaded[("agnews", "train")])
    assert any(r["text"].startswith('"Big Blue" may') for r in loaded[("agnews", "train")])
    no_title = ds.load_split("agnews", "test", data_dir, include_title=False)[0]
    assert no_title["text"].startswith("Unions representing")
    classes = (data_dir / "agnews/classes.txt").read_text().split()
    assert tuple(classes) == ds.get_info("agnews").label_names


def test_20ng_and_tweeteval_labels(loaded, data_dir):
    rec = loaded[("20ng", "train")][0]
    assert rec["id"] == "alt.atheism/49960" and rec["label"] == 0
    assert rec["text"].startswith("From: mathew <mathew@mantis.co.uk>\nSubject:")
    assert ds.get_info("20ng").label_names == tuple(sorted(ds.get_info("20ng").label_names))
    for name in ("tweeteval_hate", "tweeteval_offensive"):
        folder = data_dir / ds.get_info(name).local_dir
        lines = folder.joinpath("mapping.txt").read_text().split("\n")
        mapping = [line.split("\t")[1] for line in lines if line]
        assert tuple(mapping) == ds.get_info(name).label_names
        labels = folder.joinpath("test_labels.txt").read_text().split()
        assert [r["label"] for r in loaded[(name, "test")]] == [int(x) for x in labels]


def test_boolq_carve(loaded, data_dir):
    train, test = loaded[("boolq", "train")], loaded[("boolq", "test")]
    assert ds.load_split("boolq", "train", data_dir) == train
    assert ds.load_split("boolq", "test", data_dir) == test
    train_ids, test_ids = {r["id"] for r in train}, {r["id"] for r in test}
    assert not train_ids & test_ids
    assert len(train_ids | test_ids) == 3270
    raw = [json.loads(line) for line in (data_dir / "boolq/val.jsonl").open()]
    by_id = {f"val-{r['idx']}": r for r in raw}
    for rec in train[:20] + test[:20]:
        src = by_id[rec["id"]]
        assert rec["text"] == src["question"] and rec["text_pair"] == src["passage"]
        assert rec["label"] == int(src["label"] in (True, "true"))
    assert ds.get_info("boolq").label_names == ("no", "yes")


def test_cqa_sample(loaded):
    rec = loaded[("cqa", "train")][0]
    assert rec["id"] == "075e483d21c29a511267ef62bedc0461"
    assert rec["choices"][rec["label"]] == "ignore"
    assert rec["choice_labels"] == ["A", "B", "C", "D", "E"]


def test_mmlu_subjects(data_dir):
    physics = ds.load_split("mmlu", "test", data_dir, subjects=["high_school_physics"])
    assert len(physics) == 151
    assert {r["subject"] for r in physics} == {"high_school_physics"}
    assert len(ds.load_split("mmlu", "train", data_dir, subjects=["high_school_physics"])) == 5
    two = ["high_school_physics", "abstract_algebra"]
    assert len(ds.load_split("mmlu", "validation", data_dir, subjects=two)) == 17 + 11
    assert len(ds.MMLU_SUBJECTS) == 57
    stems = sorted(p.name[: -len("_test.csv")] for p in (data_dir / "mmlu/test").glob("*.csv"))
    assert stems == list(ds.MMLU_SUBJECTS)
    with pytest.raises(DataError) as err:
        ds.load_split("mmlu", "test", data_dir, subjects=["astrology"])
    msg = str(err.value)
    assert "astrology" in msg and "high_school_physics" in msg and "\n" not in msg


# --------------------------------------------------------------------------- errors


def test_unknown_dataset():
    with pytest.raises(DataError) as err:
        ds.get_info("arc_x")
    assert "arc_x" in str(err.value) and "arc_e" in str(err.value)
    with pytest.raises(DataError, match="arc_x"):
        ds.load_split("arc_x", "train")


def test_unknown_option(tmp_path):
    with pytest.raises(DataError, match="subject.*valid options: subjects"):
        ds.load_split("mmlu", "test", tmp_path, subject=["x"])


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_missing_local_folder_offline(monkeypatch, tmp_path, var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        ds.load_split("arc_e", "train", data_dir=tmp_path)
    assert time.monotonic() - start < 3.0
    msg = str(err.value)
    assert "\n" not in msg
    assert "allenai/ai2_arc" in msg and "arc_e" in msg
    assert str(tmp_path / "arc/ARC-Easy") in msg
    assert "set paths.data_dir or UQLORA_DATA_DIR" in msg


def test_hub_failure_is_one_line(monkeypatch, tmp_path):
    """A hub error (e.g. no network) becomes one DataError line; load_dataset is called once."""
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach the hub\nmultiple\nlines")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError) as err:
        ds.load_split("sst5", "train", data_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "SetFit/sst5" in msg and "ConnectionError" in msg
    assert len(calls) == 1


def test_missing_split_and_file(data_dir, tmp_path):
    with pytest.raises(DataError) as err:
        ds.load_split("wg_s", "validation", data_dir)
    assert "train, test" in str(err.value) and "validation" in str(err.value)
    with pytest.raises(DataError, match="valid splits: train"):
        ds.load_split("cqa", "test", data_dir)
    (tmp_path / "sst5").mkdir()
    with pytest.raises(DataError, match="stsa.fine.train"):
        ds.load_split("sst5", "train", tmp_path)


# --------------------------------------------------------------------------- hub mapping


def _fake_hub(monkeypatch, tables):
    """Replace ``datasets`` by a fake whose load_dataset serves ``tables[(id, config, split)]``."""
    calls = []

    def load_dataset(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        return tables[(hub_id, config, split)]

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_mapping(monkeypatch, tmp_path):
    arc_row = {"id": "Q1", "question": "Why?", "answerKey": "2",
               "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}}  # fmt: skip
    tables = {
        ("allenai/ai2_arc", "ARC-Easy", "validation"): [arc_row],
        ("allenai/winogrande", "winogrande_s", "validation"): [
            {"sentence": "Tom hit _ hard.", "option1": "Tom", "option2": "Bob", "answer": "2"}
        ],
        ("google/boolq", None, "validation"): [
            {"question": "is it?", "passage": "It is.", "answer": True}
        ],
        ("allenai/openbookqa", "main", "train"): [
            {"id": "7-1", "question_stem": "Sun is", "answerKey": "A",
             "choices": {"text": ["hot", "cold", "wet", "dry"], "label": ["A", "B", "C", "D"]}}
        ],  # fmt: skip
        ("cais/mmlu", "all", "dev"): [
            {"question": "1+1?", "subject": "abstract_algebra", "choices": ["1", "2", "3", "4"],
             "answer": 1}
        ],  # fmt: skip
        ("cais/mmlu", "anatomy", "test"): [
            {"question": "Bone?", "subject": "anatomy", "choices": list("abcd"), "answer": 3}
        ],
        ("SetFit/20_newsgroups", None, "train"): [
            {"text": "hi", "label": 7, "label_text": "rec.autos"}
        ],
        ("nyu-mll/glue", "cola", "validation"): [{"sentence": "Ok .", "label": 1, "idx": 0}],
        ("tau/commonsense_qa", None, "validation"): [
            {"id": "c1", "question": "Where?", "question_concept": "x", "answerKey": "E",
             "choices": {"label": list("ABCDE"), "text": list("vwxyz")}}
        ],  # fmt: skip
    }
    calls = _fake_hub(monkeypatch, tables)
    assert ds.available_splits("wg_s", tmp_path) == ["train", "test"]
    assert ds.available_splits("sst2", tmp_path) == ["train", "validation"]

    arc = ds.load_split("arc_e", "validation", tmp_path)
    assert arc == [{"id": "Q1", "question": "Why?", "choices": ["a", "b", "c"], "label": 1,
                    "choice_labels": ["1", "2", "3"]}]  # fmt: skip
    wg = ds.load_split("wg_s", "test", tmp_path)[0]
    assert wg["label"] == 1
    assert wg["cloze"] == [["Tom hit Tom", " hard."], ["Tom hit Bob", " hard."]]
    boolq = ds.load_split("boolq", "test", tmp_path)[0]
    assert boolq == {"id": "test-0", "text": "is it?", "text_pair": "It is.", "label": 1}
    assert ds.load_split("obqa", "train", tmp_path)[0]["label"] == 0
    mmlu = ds.load_split("mmlu", "train", tmp_path)[0]
    assert mmlu["label"] == 1 and mmlu["choice_labels"] == ["A", "B", "C", "D"]
    assert ds.load_split("mmlu", "test", tmp_path, subjects=["anatomy"])[0]["label"] == 3
    assert ds.load_split("20ng", "train", tmp_path)[0]["label"] == ds.NEWSGROUPS.index("rec.autos")
    assert ds.load_split("cola", "test", tmp_path)[0]["label"] == 1
    assert ds.load_split("cqa", "test", tmp_path)[0]["label"] == 4
    assert ("cais/mmlu", "anatomy", "test") in calls
    with pytest.raises(DataError, match="valid splits: train, validation"):
        ds.load_split("sst2", "test", tmp_path)


# --------------------------------------------------------------------------- custom datasets


def _write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_custom_classification(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [
        {"sent": "good, really \"good\"", "lab": "pos"},
        {"sent": "bad", "lab": "neg"},
    ])  # fmt: skip
    test = _write_csv(tmp_path / "test.tsv", [{"q": "a?", "p": "b", "y": "1"}], delimiter="\t")
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"id": "v1", "text": "meh", "label": 0}) + "\n")

    opts = {"files": {"train": str(train)}, "text_column": "sent", "label_column": "lab",
            "label_names": ["neg", "pos"]}  # fmt: skip
    records = ds.load_split("custom_classification", "train", **opts)
    assert records == [
        {"id": "train-0", "text": 'good, really "good"', "text_pair": None, "label": 1},
        {"id": "train-1", "text": "bad", "text_pair": None, "label": 0},
    ]
    info = ds.get_info("custom_classification", **opts)
    assert info.num_classes == 2 and info.label_names == ("neg", "pos")

    pair = ds.load_split("custom_classification", "test", tmp_path,
                         files={"test": "test.tsv"}, text_column="q",
                         text_pair_column="p", label_column="y")  # fmt: skip
    assert pair == [{"id": "test-0", "text": "a?", "text_pair": "b", "label": 1}]
    jl = ds.load_split("custom_classification", "validation", files={"validation": str(val)})
    assert jl == [{"id": "v1", "text": "meh", "text_pair": None, "label": 0}]
    assert ds.get_info("custom_classification", files={"test": str(test)}, label_column="y",
                       text_column="q").num_classes == 2  # inferred: max label + 1  # fmt: skip
    assert ds.available_splits("custom_classification", files={"test": str(test)}) == ["test"]

    with pytest.raises(DataError) as err:
        ds.load_split("custom_classification", "train", files={"train": str(train)},
                      text_column="sentence", label_column="lab")  # fmt: skip
    msg = str(err.value)
    assert "sentence" in msg and "sent, lab" in msg
    with pytest.raises(DataError, match="label 'pos'"):
        ds.load_split("custom_classification", "train", files={"train": str(train)},
                      text_column="sent", label_column="lab")  # fmt: skip
    with pytest.raises(DataError, match="valid splits: train"):
        ds.load_split("custom_classification", "test", files={"train": str(train)})


def test_custom_multiple_choice(tmp_path):
    jl = tmp_path / "mc.jsonl"
    jl.write_text(
        json.dumps({"question": "2+2?", "options": ["3", "4", "5"], "answer": "B"}) + "\n"
        + json.dumps({"question": "1+1?", "options": ["2", "3"], "answer": 0}) + "\n"
    )
    records = ds.load_split("custom_multiple_choice", "train", files={"train": str(jl)},
                            choices_column="options", label_column="answer")  # fmt: skip
    assert records == [
        {"id": "train-0", "question": "2+2?", "choices": ["3", "4", "5"], "label": 1,
         "choice_labels": ["A", "B", "C"]},
        {"id": "train-1", "question": "1+1?", "choices": ["2", "3"], "label": 0,
         "choice_labels": ["A", "B"]},
    ]  # fmt: skip
    info = ds.get_info("custom_multiple_choice", files={"train": str(jl)},
                       choices_column="options", label_column="answer")  # fmt: skip
    assert info.num_classes == 3  # inferred: the most choices

    table = _write_csv(tmp_path / "mc.csv", [
        {"id": "q7", "stem": "Sky?", "a": "blue", "b": "green", "c": "red", "gold": "A"},
        {"id": "q8", "stem": "Grass?", "a": "blue", "b": "green", "c": "red", "gold": "1"},
    ])  # fmt: skip
    opts = {"files": {"test": str(table)}, "question_column": "stem",
            "choice_columns": ["a", "b", "c"], "label_column": "gold"}  # fmt: skip
    records = ds.load_split("custom_multiple_choice", "test", **opts)
    assert [r["id"] for r in records] == ["q7", "q8"]
    assert [r["label"] for r in records] == [0, 1]
    assert records[0]["choices"] == ["blue", "green", "red"]
    assert ds.get_info("custom_multiple_choice", **opts).num_classes == 3

    with pytest.raises(DataError) as err:
        ds.load_split("custom_multiple_choice", "test", **{**opts, "choice_columns": ["a", "d"]})
    msg = str(err.value)
    assert "'d'" in msg and "id, stem, a, b, c, gold" in msg


def test_data_files_are_hashed_and_a_modified_file_fails_in_one_line(tmp_path):
    """results.json records every data file's SHA-256; a file differing from SHA256SUMS is refused."""
    import hashlib
    import shutil

    from uqlora.data.datasets import default_data_dir, verify_files
    from uqlora.errors import DataError

    shared = default_data_dir()
    hashes = verify_files("sst2", shared)  # the real copy matches ../shared/data/SHA256SUMS
    listed = dict(line.split()[::-1] for line in (shared / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert hashes and all(listed[f"./{rel}"] == h for rel, h in hashes.items())
    # a private copy with one byte changed in one file
    shutil.copytree(shared / "sst2", tmp_path / "sst2")
    shutil.copy(shared / "SHA256SUMS", tmp_path / "SHA256SUMS")
    victim = sorted(p for p in (tmp_path / "sst2").rglob("*") if p.is_file())[0]
    victim.write_bytes(victim.read_bytes() + b" ")
    with pytest.raises(DataError, match="was modified or corrupted") as e:
        verify_files("sst2", tmp_path)
    assert str(victim) in str(e.value) and "\n" not in str(e.value)
    assert hashlib.sha256(victim.read_bytes()).hexdigest()[:12] in str(e.value)
    assert verify_files("custom_classification", tmp_path) == {}


# --------------------------------------------------------------------------- generation


GEN_COUNTS = {
    "gsm8k": {"train": 7473, "test": 1319},
    "instruct": {"train": 1740, "test": 435},
    "instruct_mix": {"train": 9213, "test": 1754},
}
GEN_KEYS = {"id", "prompt", "input", "response", "source"}


@pytest.fixture(scope="module")
def generated(data_dir):
    return {(n, s): ds.load_split(n, s, data_dir) for n in GEN_COUNTS for s in GEN_COUNTS[n]}


@pytest.mark.parametrize(("name", "split"), [(n, s) for n in GEN_COUNTS for s in GEN_COUNTS[n]])
def test_generation_counts_and_records(generated, data_dir, name, split):
    records = generated[(name, split)]
    info = ds.get_info(name)
    assert info.task == ds.GENERATION and info.num_classes == 0 and info.label_names is None
    assert ds.available_splits(name, data_dir) == ["train", "test"]
    assert len(records) == GEN_COUNTS[name][split]
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    for r in records:
        assert GEN_KEYS <= set(r) <= GEN_KEYS | {"answer_number"}
        assert r["prompt"].strip() and r["response"].strip()
        assert r["input"] is None or r["input"].strip()
        assert r["source"] in ("gsm8k", "gpteacher", "self_instruct")
        assert ("answer_number" in r) == (r["source"] == "gsm8k")


def test_gsm8k_rows_and_final_numbers(generated, data_dir):
    raw = [json.loads(line) for line in (data_dir / "gsm8k/train.jsonl").open()]
    train = generated[("gsm8k", "train")]
    assert train[0]["id"] == "gsm8k-train-0" and train[0]["input"] is None
    assert train[0]["prompt"].startswith("Natalia sold clips to 48 of her friends in April")
    assert train[0]["response"] == raw[0]["answer"] and train[0]["response"].endswith("\n#### 72")
    assert train[0]["answer_number"] == "72"
    assert [r["prompt"] for r in train] == [r["question"] for r in raw]
    assert [r["response"] for r in train] == [r["answer"] for r in raw]  # worked answers kept verbatim
    assert all(float(r["answer_number"]) == float(r["answer_number"]) for r in train)  # all parse
    test = generated[("gsm8k", "test")]
    assert test[0]["answer_number"] == "18" and test[0]["prompt"].startswith("Janet’s ducks lay 16 eggs")
    # thousands separators are dropped: at least one answer in the test split is written "x,yyy"
    with_comma = [r for r in test if "#### " in r["response"] and "," in r["response"].rsplit("#### ", 1)[1]]
    assert with_comma and all("," not in r["answer_number"] for r in with_comma)


@pytest.mark.parametrize(("answer", "number"), [
    ("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
    ("Total: 1,200 + 34 = <<1200+34=1234>>1234\n#### 1,234", "1234"),
    ("It dropped by 5.\n#### -5", "-5"),
    ("Half of it.\n####0.5\n", "0.5"),
    ("#### 12 ", "12"),
])  # fmt: skip
def test_gsm8k_answer_number(answer, number):
    from uqlora.data.sources.gsm8k import answer_number

    assert answer_number(answer) == number


@pytest.mark.parametrize("answer", ["The answer is 7.", "#### seven", "#### 7 apples", "####", "#### 1\n#### 2 and 3"])
def test_gsm8k_answer_number_refuses_answers_without_a_final_number(answer):
    from uqlora.data.sources.gsm8k import answer_number

    with pytest.raises(DataError, match="no final '#### <number>'") as err:
        answer_number(answer)
    assert "\n" not in str(err.value)


def test_instruct_rows_match_the_files(generated, data_dir):
    gpt_raw = json.loads((data_dir / "instruct/gpteacher_roleplay.json").read_text())
    si_raw = [json.loads(line) for line in (data_dir / "instruct/self_instruct_user_oriented.jsonl").open()]
    records = generated[("instruct", "train")] + generated[("instruct", "test")]
    gpt = {r["id"]: r for r in records if r["source"] == "gpteacher"}
    assert len(gpt) == len(gpt_raw) == 1923
    for i in (0, 1, 500, 1922):
        rec, row = gpt[f"gpteacher-{i}"], gpt_raw[i]
        assert (rec["prompt"], rec["input"] or "", rec["response"]) == (row["instruction"], row["input"], row["response"])
    assert sum(1 for r in gpt.values() if r["input"]) == sum(1 for r in gpt_raw if r["input"]) == 443
    si = {r["id"]: r for r in records if r["source"] == "self_instruct"}
    assert len(si) == len(si_raw) == 252  # one instance per task in this file
    for task in (si_raw[0], si_raw[100], si_raw[251]):
        rec, inst = si[task["id"]], task["instances"][0]
        assert (rec["prompt"], rec["input"] or "", rec["response"]) == (task["instruction"], inst["input"], inst["output"])
    assert si["user_oriented_task_1"]["response"] == "Confident"


def test_instruct_test_carve_is_fixed_and_disjoint(generated, data_dir):
    from uqlora.data.sources.common import carve_indices

    train, test = generated[("instruct", "train")], generated[("instruct", "test")]
    assert ds.load_split("instruct", "test", data_dir) == test  # deterministic
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    # the documented carve: default_rng(0).permutation(n), the first 20% are test, per source
    _, gpt_test = carve_indices(1923, 0.2, 0)
    assert [r["id"] for r in test if r["source"] == "gpteacher"] == [f"gpteacher-{i}" for i in gpt_test]
    assert (len(gpt_test), sum(r["source"] == "self_instruct" for r in test)) == (385, 50)
    # sources select files; the mixture is gsm8k's split followed by instruct's, sources kept
    only = ds.load_split("instruct", "test", data_dir, sources=["self_instruct"])
    assert only == [r for r in test if r["source"] == "self_instruct"]
    mix = generated[("instruct_mix", "test")]
    assert mix == generated[("gsm8k", "test")] + test
    assert ds.load_split("instruct_mix", "test", data_dir, sources=["gpteacher", "gsm8k"]) == (
        generated[("gsm8k", "test")] + [r for r in test if r["source"] == "gpteacher"])


def test_generation_option_errors(data_dir):
    with pytest.raises(DataError, match="unknown source 'alpaca'; valid sources: gpteacher, self_instruct"):
        ds.load_split("instruct", "train", data_dir, sources=["alpaca"])
    with pytest.raises(DataError, match="instruct_mix: empty sources list; valid sources: gsm8k, gpteacher"):
        ds.load_split("instruct_mix", "train", data_dir, sources=[])
    with pytest.raises(DataError, match="instruct_mix.*no split 'validation'.*valid splits: train, test"):
        ds.load_split("instruct_mix", "validation", data_dir)
    with pytest.raises(DataError, match="unknown option.*subjects.*valid options: sources"):
        ds.load_split("instruct_mix", "train", data_dir, subjects=["x"])


def test_generation_hub_mapping(monkeypatch, tmp_path):
    lima = [{"conversations": ["Write a haiku.", "Leaves fall..."], "source": "wikihow"},
            {"conversations": ["Only a question?"], "source": "x"}]  # fmt: skip
    lima += [{"conversations": [f"Q{i}", f"A{i}", "more", "turns"], "source": "multi_turn"} for i in range(8)]
    tables = {
        ("openai/gsm8k", "main", "test"): [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}],
        ("GAIR/lima", None, "train"): lima,
    }
    calls = _fake_hub(monkeypatch, tables)
    assert ds.load_split("gsm8k", "test", tmp_path) == [
        {"id": "gsm8k-test-0", "prompt": "1+1?", "input": None, "response": "1+1=<<1+1=2>>2\n#### 2",
         "source": "gsm8k", "answer_number": "2"}]  # fmt: skip
    train, test = ds.load_split("instruct", "train", tmp_path), ds.load_split("instruct", "test", tmp_path)
    assert len(train) + len(test) == 9 and len(test) == 2  # the single-turn row is skipped; 20% of 9
    assert {r["source"] for r in train + test} == {"lima"}
    first = next(r for r in train + test if r["id"] == "lima-0")
    assert (first["prompt"], first["response"]) == ("Write a haiku.", "Leaves fall...")
    assert "lima-1" not in {r["id"] for r in train + test}
    assert ("GAIR/lima", None, "train") in calls
    with pytest.raises(DataError, match="sources selects local files"):
        ds.load_split("instruct", "train", tmp_path, sources=["gpteacher"])
    mix = ds.load_split("instruct_mix", "test", tmp_path)
    assert [r["source"] for r in mix] == ["gsm8k", "lima", "lima"]


def test_generation_files_are_checked_against_sha256sums(data_dir):
    listed = dict(line.split()[::-1] for line in (data_dir / "SHA256SUMS").read_text().splitlines() if line.strip())
    gsm, inst = ds.verify_files("gsm8k", data_dir), ds.verify_files("instruct", data_dir)
    assert set(gsm) == {"gsm8k/LICENSE", "gsm8k/train.jsonl", "gsm8k/test.jsonl"}
    assert {"instruct/gpteacher_roleplay.json", "instruct/self_instruct_user_oriented.jsonl"} <= set(inst)
    assert all(listed[f"./{rel}"] == h for rel, h in {**gsm, **inst}.items())
    assert ds.verify_files("instruct_mix", data_dir) == {**gsm, **inst}
