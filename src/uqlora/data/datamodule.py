"""The LightningDataModule: train / val / calib / test / ood splits with a fixed seed.

Where each split comes from (``data.*``):

* ``test``  -- the dataset's ``test`` split (each ``conf/data`` file says which official split that is);
* ``val``   -- early stopping and model selection: the official ``validation`` split when the dataset has
  one distinct from test and ``val_source=official``, else ``val_size`` carved from train;
* ``calib`` -- for post-hoc methods (temperature, Laplace prior, AdUE): ``calib_size`` carved from train,
  never the test split and never the val split;
* ``train`` -- the rest of train, then subsampled to ``max_train_samples``;
* ``ood``   -- optional: ``data.ood`` names another dataset whose ``ood_split`` is scored as
  out-of-distribution (multiple-choice questions become plain texts for classification models).

Carving uses ``numpy.random.default_rng(seed)``: the same seed gives the same splits. Sizes are
fractions (< 1) or counts (>= 1).

Loaders give the collator ``(position, record)`` pairs, so every batch carries ``index`` (the examples'
positions in the split). Training loaders shuffle (:class:`EpochShuffleSampler`); evaluation loaders visit
the examples longest first (:class:`LengthGroupedSampler`), so a batch is padded to its own longest example
rather than to the split's; the loader's sampler order (or the batches' ``index``) puts predictions back in
data order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from uqlora.data import datasets as ds
from uqlora.data.prompts import Collator
from uqlora.errors import DataError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "calib", "test", "ood")


@dataclass
class TaskInfo:
    name: str
    task: str
    num_classes: int
    label_names: tuple | None


def task_info(dcfg) -> TaskInfo:
    info = ds.get_info(dcfg.name, **dict(dcfg.get("options") or {}))
    return TaskInfo(info.name, info.task, int(info.num_classes), info.label_names)


def _size(spec, n: int) -> int:
    if spec is None:
        return 0
    spec = float(spec)
    k = int(round(spec * n)) if spec < 1 else int(spec)
    return max(0, min(k, n))


def _subsample(records: list, k, rng) -> list:
    if k is None or int(k) >= len(records):
        return records
    idx = np.sort(rng.permutation(len(records))[: int(k)])
    return [records[i] for i in idx]


def _as_classification(rec: dict) -> dict:
    if "text" in rec:
        return rec
    return {"id": rec["id"], "text": rec["question"], "text_pair": None, "label": -1}


def build_splits(dcfg, seed: int) -> dict[str, list[dict]]:
    """Load and carve the splits; no tokenizer needed (tests and ``eval.py`` use this directly)."""
    name, opts = dcfg.name, dict(dcfg.get("options") or {})
    data_dir = dcfg.get("data_dir")
    info = task_info(dcfg)
    avail = ds.available_splits(name, data_dir, **opts)
    rng = np.random.default_rng(seed)
    train = ds.load_split(name, "train", data_dir, **opts)
    perm = rng.permutation(len(train))
    n_calib = _size(dcfg.get("calib_size"), len(train))
    calib = [train[i] for i in np.sort(perm[:n_calib])]
    rest = perm[n_calib:]
    test_split = "test"
    if "test" not in avail:  # e.g. SST-2 from the hub: unlabelled test -> official validation is the test set
        if "validation" not in avail:
            raise DataError(f"dataset '{name}' has no test split here (available: {', '.join(avail)})")
        log.warning("dataset '%s' has no labelled test split here: using its validation split as test", name)
        test_split = "validation"
    if "validation" in avail and test_split != "validation" and dcfg.get("val_source", "official") == "official":
        val = ds.load_split(name, "validation", data_dir, **opts)
    else:
        n_val = _size(dcfg.get("val_size", 0.1), len(train))
        val, rest = [train[i] for i in np.sort(rest[:n_val])], rest[n_val:]
    train = [train[i] for i in np.sort(rest)]
    test = ds.load_split(name, test_split, data_dir, **opts)
    out = {"train": train, "val": val, "calib": calib, "test": test}
    for split in ("train", "val", "calib", "test"):
        out[split] = _subsample(out[split], dcfg.get(f"max_{split}_samples"), rng)
    if dcfg.get("ood"):
        ood_opts = dict(dcfg.get("ood_options") or {})
        ood = ds.load_split(dcfg.ood, dcfg.get("ood_split", "test"), data_dir, **ood_opts)
        if info.task == "classification":
            ood = [_as_classification(r) for r in ood]
        elif "choices" not in ood[0]:
            raise DataError(f"data.ood='{dcfg.ood}' is a classification dataset; a multiple-choice model cannot score it")
        out["ood"] = _subsample(ood, dcfg.get("max_ood_samples"), rng)
    for split, recs in out.items():
        if not recs and (split != "calib" or n_calib):
            raise DataError(f"split '{split}' of dataset '{name}' is empty after carving/subsampling; "
                            f"check data.max_{split}_samples / data.{split}_size")
        if split != "ood":
            _check_labels(name, split, recs, info.num_classes)
    return out


def _check_labels(name, split, recs, C):
    bad = [r for r in recs if not 0 <= int(r["label"]) < (len(r["choices"]) if "choices" in r else C)]
    if bad:
        raise DataError(f"dataset '{name}' split '{split}': label {bad[0]['label']} of record {bad[0].get('id')} "
                        f"is outside the {C} configured classes (0..{C - 1})")


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): a run resumed at epoch e sees the same order as an
    uninterrupted one (Lightning calls ``set_epoch`` before every epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Evaluation order: the examples (all, or the positions ``indices``: a process's shard) by decreasing
    padded length, ties in data order. Deterministic, so iterating the loader's batch sampler again gives the
    order in which predictions were made."""

    def __init__(self, lengths: list[int], indices=None):
        self.lengths = list(lengths)
        idx = range(len(self.lengths)) if indices is None else indices
        self.order = sorted(idx, key=lambda i: (-self.lengths[i], i))

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


class IndexedRecords(torch.utils.data.Dataset):
    """A split's records as ``(position, record)`` pairs (the collator turns the positions into ``index``)."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return i, self.records[i]


class UQDataModule(pl.LightningDataModule):
    def __init__(self, dcfg, tokenizer, head: str, causal: bool, seed: int = 0,
                 records: dict[str, list[dict]] | None = None, shuffle_seed: int | None = None,
                 cloze_impl: str = "packed"):
        super().__init__()
        self.cfg, self.seed = dcfg, int(seed)
        self.shuffle_seed = self.seed if shuffle_seed is None else int(shuffle_seed)
        self.info = task_info(dcfg)
        self.collator = Collator(tokenizer, head, self.info.task, self.info.num_classes, int(dcfg.max_length),
                                 dcfg.get("prompt"), causal=causal, cloze_impl=cloze_impl)
        self.records = records
        self._lengths: dict[str, tuple[list, list[int]]] = {}

    def setup(self, stage=None):
        if self.records is None:
            self.records = build_splits(self.cfg, self.seed)
            log.info("splits of %s: %s", self.cfg.name, {k: len(v) for k, v in self.records.items()})

    def has(self, split: str) -> bool:
        self.setup()
        return bool(self.records.get(split))

    def lengths(self, split: str) -> list[int]:
        """The padded length of every example of ``split`` (:meth:`Collator.length`), cached per records list."""
        recs = self.records[split]
        cached = self._lengths.get(split)
        if cached is None or cached[0] is not recs:
            cached = (recs, [self.collator.length(r) for r in recs])
            self._lengths[split] = cached
        return cached[1]

    def loader(self, split: str, shuffle: bool = False, group_by_length: bool = True) -> DataLoader:
        """Shuffled (training) or evaluation loader of ``split``; evaluation batches are grouped by length
        unless ``group_by_length=False`` (data order)."""
        self.setup()
        if split not in self.records:
            raise DataError(f"no '{split}' split configured; available: {', '.join(self.records)}")
        bs = int(self.cfg.batch_size if shuffle else self.cfg.get("eval_batch_size", self.cfg.batch_size))
        if shuffle:
            sampler = EpochShuffleSampler(len(self.records[split]), self.shuffle_seed)
        else:
            sampler = LengthGroupedSampler(self.lengths(split)) if group_by_length else None
        return DataLoader(IndexedRecords(self.records[split]), batch_size=bs, sampler=sampler,
                          collate_fn=self.collator, num_workers=int(self.cfg.get("num_workers", 0)))

    def train_dataloader(self):
        return self.loader("train", shuffle=True)

    def val_dataloader(self):
        return self.loader("val")

    def test_dataloader(self):
        return self.loader("test")
