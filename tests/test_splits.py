"""Tests of ``build_splits``: each split draws from its own random stream (seed, split name), so one
split's size never changes which examples another split holds. Reads the real SST-2 and CoLA copies
under ``default_data_dir()`` (skipped without them)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import compose
from uqlora.data import datasets as ds
from uqlora.data.datamodule import build_splits, split_rng


@pytest.fixture(scope="module")
def base():
    if not (ds.default_data_dir() / "sst2").is_dir():
        pytest.skip("no local SST-2 copy")
    return {name: compose([f"data={name}"]).data for name in ("sst2", "cola")}


def _splits(base, name="sst2", seed=0, **changes):
    dcfg = OmegaConf.merge(base[name], changes)
    return build_splits(dcfg, seed)


def _ids(records):
    return [r["id"] for r in records]


def test_test_ids_do_not_depend_on_the_other_splits_sizes(base):
    """max_train_samples = 100, 1000, None; max_val_samples; calib_size: the same 50 test questions."""
    ref = _ids(_splits(base, max_test_samples=50)["test"])
    assert len(ref) == 50 and len(set(ref)) == 50
    for changes in (
        {"max_train_samples": 100}, {"max_train_samples": 1000}, {"max_train_samples": None},
        {"max_val_samples": 20}, {"max_val_samples": None}, {"max_calib_samples": 30},
        {"calib_size": 0.05}, {"calib_size": 500, "max_train_samples": 100, "max_val_samples": 10},
    ):  # fmt: skip
        got = _ids(_splits(base, max_test_samples=50, **changes)["test"])
        assert got == ref, changes
    # another seed draws another subset; a larger subsample contains the smaller one
    assert _ids(_splits(base, seed=1, max_test_samples=50)["test"]) != ref
    assert set(ref) <= set(_ids(_splits(base, max_test_samples=200)["test"]))


def test_carve_does_not_depend_on_subsample_sizes_or_each_other(base):
    """CoLA has no validation split: val and calib are carved from train. calib does not move with
    val_size, val not with calib_size, and neither with any max_*_samples."""
    ref = _splits(base, "cola", max_train_samples=100)
    assert len(ref["calib"]) == round(0.1 * 8551) and len(ref["val"]) == round(0.1 * 8551)
    ids = {s: set(_ids(ref[s])) for s in ("train", "val", "calib")}
    assert not ids["val"] & ids["calib"] and not (ids["val"] | ids["calib"]) & ids["train"]
    other = _splits(base, "cola", max_train_samples=1000, max_test_samples=10, max_ood_samples=3)
    assert _ids(other["val"]) == _ids(ref["val"]) and _ids(other["calib"]) == _ids(ref["calib"])
    assert set(_ids(ref["train"])) <= set(_ids(other["train"]))
    assert _ids(_splits(base, "cola", val_size=0.2)["calib"]) == _ids(ref["calib"])
    assert _ids(_splits(base, "cola", calib_size=0.3)["val"]) == _ids(ref["val"])
    # each subsample is drawn from its own split's stream
    small = _splits(base, "cola", max_val_samples=40, max_calib_samples=40)
    assert set(_ids(small["val"])) <= ids["val"] and set(_ids(small["calib"])) <= ids["calib"]


def test_split_streams_are_stable_and_distinct():
    """The stream of (seed, name) is a fixed function of both (crc32, not Python's salted hash)."""
    first = split_rng(3, "test").integers(0, 2**31, size=4).tolist()
    assert first == split_rng(3, "test").integers(0, 2**31, size=4).tolist()
    assert first != split_rng(3, "train").integers(0, 2**31, size=4).tolist()
    assert first != split_rng(4, "test").integers(0, 2**31, size=4).tolist()


def test_generation_splits_and_task_info():
    """gsm8k / instruct_mix: no label checks, task 'generation' with 0 classes; val and calib carved
    from train; the mix's test subsample keeps every record's source."""
    from uqlora.data.datamodule import task_info
    from uqlora.errors import DataError

    if not (ds.default_data_dir() / "gsm8k").is_dir():
        pytest.skip("no local GSM8K copy")
    dcfg = OmegaConf.merge(compose(["data=instruct_mix"]).data, {"max_train_samples": 64, "max_test_samples": 40})
    info = task_info(dcfg)
    assert (info.task, info.num_classes, info.label_names) == ("generation", 0, None)
    splits = build_splits(dcfg, 0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 64, "val": 921, "calib": 921, "test": 40}
    assert all(r["prompt"] and r["response"] and r["source"] for v in splits.values() for r in v)
    ids = {k: {r["id"] for r in v} for k, v in splits.items()}
    assert not ids["train"] & ids["val"] and not ids["val"] & ids["calib"] and not ids["test"] & ids["train"]
    assert _ids(build_splits(OmegaConf.merge(dcfg, {"max_train_samples": None}), 0)["test"]) == _ids(splits["test"])
    with pytest.raises(DataError, match="sst2.*classification dataset; a generation model cannot score it"):
        build_splits(OmegaConf.merge(dcfg, {"ood": "sst2"}), 0)
    gsm = build_splits(OmegaConf.merge(compose(["data=gsm8k"]).data, {"max_test_samples": 5, "ood": "instruct",
                                                                       "max_ood_samples": 3}), 0)
    assert len(gsm["test"]) == 5 and {r["source"] for r in gsm["ood"]} <= {"gpteacher", "self_instruct"}
