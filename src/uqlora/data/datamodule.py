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

Generation datasets (task ``generation``: gsm8k, instruct, instruct_mix) have no labels: their records
are checked for a ``prompt`` and a ``response`` instead, and ``task_info`` reports ``num_classes`` 0 and
no label names.

Randomness: every split draws from its own stream, ``numpy.random.default_rng([seed, crc32(name)])``
(:func:`split_rng`): the carve of train into calib / val / train uses the stream ``"carve"``, and each
split's subsample (``max_<split>_samples``) the stream of its own name. So the same seed gives the same
splits, and the size of one split never changes which examples another split holds: the test questions
are the same whatever ``max_train_samples``, ``max_val_samples`` or ``calib_size``. The carve takes calib
from the front of one permutation of train and val from its back, so calib does not depend on
``val_size`` nor val on ``calib_size``. A subsample of k is the first k of a fixed permutation, so a
smaller subsample is contained in a larger one. Sizes are fractions (< 1) or counts (>= 1).

Loaders give the collator ``(position, record)`` pairs, so every batch carries ``index`` (the examples'
positions in the split). Training loaders shuffle (:class:`EpochShuffleSampler`); evaluation loaders visit
the examples longest first (:class:`LengthGroupedSampler`), so a batch is padded to its own longest example
rather than to the split's; the loader's sampler order (or the batches' ``index``) puts predictions back in
data order. Token-level SFT loaders (head ``lm_sft``) read plain records in data order.
"""
from __future__ import annotations

import logging
import zlib
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


def split_rng(seed: int, stream: str) -> np.random.Generator:
    """The random stream named ``stream`` (a split name, or ``"carve"``) of ``seed``:
    ``default_rng([seed, crc32(stream)])`` -- stable across processes, unlike Python's salted ``hash``."""
    return np.random.default_rng([int(seed), zlib.crc32(stream.encode("utf-8"))])


def _subsample(records: list, k, rng) -> list:
    if k is None or int(k) >= len(records):
        return records
    idx = np.sort(rng.permutation(len(records))[: int(k)])
    return [records[i] for i in idx]


def _as_classification(rec: dict) -> dict:
    if "text" in rec:
        return rec
    return {"id": rec["id"], "text": rec["question"], "text_pair": None, "label": -1}


def _carve(n: int, dcfg, carve_val: bool, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, calib) indices into the official train split, each sorted: one permutation of the
    ``"carve"`` stream; calib is its first ``calib_size``, val (when carved) its last ``val_size``."""
    perm = split_rng(seed, "carve").permutation(n)
    n_calib = _size(dcfg.get("calib_size"), n)
    n_val = min(_size(dcfg.get("val_size", 0.1), n), n - n_calib) if carve_val else 0
    calib, train, val = perm[:n_calib], perm[n_calib : n - n_val], perm[n - n_val :]
    return np.sort(train), np.sort(val), np.sort(calib)


def _test_split(name: str, avail: list[str]) -> str:
    """``test``, or the official validation split where no labelled test split is available here."""
    if "test" in avail:
        return "test"
    if "validation" not in avail:  # e.g. SST-2 from the hub: unlabelled test -> validation is the test set
        raise DataError(f"dataset '{name}' has no test split here (available: {', '.join(avail)})")
    log.warning("dataset '%s' has no labelled test split here: using its validation split as test", name)
    return "validation"


def _load_ood(dcfg, task: str, data_dir, num_classes: int = 0) -> list[dict]:
    """The ``ood`` split: classification models see its questions as plain texts (label -1); multiple-choice
    models keep its choices and labels (so it is also scored as a shifted test set) and skip the questions
    with more choices than the model scores (ARC has a few 5-choice questions; OBQA and MMLU have 4)."""
    ood_opts = dict(dcfg.get("ood_options") or {})
    ood = ds.load_split(dcfg.ood, dcfg.get("ood_split", "test"), data_dir, **ood_opts)
    ood_task = ds.get_info(dcfg.ood, **ood_opts).task
    if (task == ds.GENERATION) != (ood_task == ds.GENERATION):
        raise DataError(f"data.ood='{dcfg.ood}' is a {ood_task} dataset; a {task} model cannot score it "
                        "(generation and label tasks do not mix)")
    if task == ds.CLASSIFICATION:
        return [_as_classification(r) for r in ood]
    if task == ds.MULTIPLE_CHOICE and "choices" not in ood[0]:
        raise DataError(f"data.ood='{dcfg.ood}' is a classification dataset; a multiple-choice model cannot score it")
    if task == ds.MULTIPLE_CHOICE and num_classes:
        kept = [r for r in ood if len(r["choices"]) <= num_classes]
        if not kept:
            raise DataError(f"data.ood='{dcfg.ood}': every question has more than the model's {num_classes} choices")
        if len(kept) < len(ood):
            log.info("data.ood=%s: %d of %d questions have more than %d choices and are left out",
                     dcfg.ood, len(ood) - len(kept), len(ood), num_classes)
        ood = kept
    return ood


def build_splits(dcfg, seed: int) -> dict[str, list[dict]]:
    """Load and carve the splits; no tokenizer needed (tests and ``eval.py`` use this directly)."""
    name, opts = dcfg.name, dict(dcfg.get("options") or {})
    data_dir = dcfg.get("data_dir")
    info = task_info(dcfg)
    avail = ds.available_splits(name, data_dir, **opts)
    train = ds.load_split(name, "train", data_dir, **opts)
    test_split = _test_split(name, avail)
    official_val = ("validation" in avail and test_split != "validation"
                    and dcfg.get("val_source", "official") == "official")
    train_idx, val_idx, calib_idx = _carve(len(train), dcfg, not official_val, seed)
    out = {
        "train": [train[i] for i in train_idx],
        "val": ds.load_split(name, "validation", data_dir, **opts) if official_val else [train[i] for i in val_idx],
        "calib": [train[i] for i in calib_idx],
        "test": ds.load_split(name, test_split, data_dir, **opts),
    }
    if dcfg.get("ood"):
        out["ood"] = _load_ood(dcfg, info.task, data_dir, info.num_classes)
    for split in out:
        out[split] = _subsample(out[split], dcfg.get(f"max_{split}_samples"), split_rng(seed, split))
    _check_splits(name, info, out, calib_wanted=len(calib_idx) > 0)
    return out


def _check_splits(name: str, info: TaskInfo, out: dict[str, list[dict]], calib_wanted: bool) -> None:
    """No split is empty (calib only when it was asked for); labels in range, or generation texts present."""
    for split, recs in out.items():
        if not recs and (split != "calib" or calib_wanted):
            raise DataError(f"split '{split}' of dataset '{name}' is empty after carving/subsampling; "
                            f"check data.max_{split}_samples / data.{split}_size")
        if info.task == ds.GENERATION:
            _check_generation(name, split, recs)
        elif split != "ood":
            _check_labels(name, split, recs, info.num_classes)


def _check_generation(name, split, recs):
    bad = [r for r in recs if not (isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str))]
    if bad:
        raise DataError(f"dataset '{name}' split '{split}': record {bad[0].get('id')} has no prompt/response text "
                        "(a generation dataset needs both)")


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
        if head == "lm_sft":  # token-level SFT of generation records (uqlora.data.sft)
            from uqlora.data.sft import SFTCollator

            self.collator = SFTCollator(tokenizer, int(dcfg.max_length), bool(dcfg.get("mask_prompt", True)))
        else:
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
        indexed = hasattr(self.collator, "length")  # the SFT collator takes plain records, in data order
        if shuffle:
            sampler = EpochShuffleSampler(len(self.records[split]), self.shuffle_seed)
        else:
            sampler = LengthGroupedSampler(self.lengths(split)) if group_by_length and indexed else None
        data = IndexedRecords(self.records[split]) if indexed else self.records[split]
        return DataLoader(data, batch_size=bs, sampler=sampler, collate_fn=self.collator,
                          num_workers=int(self.cfg.get("num_workers", 0)))

    def train_dataloader(self):
        return self.loader("train", shuffle=True)

    def val_dataloader(self):
        return self.loader("val")
