"""uqlora from Python, without Hydra: a backbone (with a PEFT adapter) and the uncertainty methods fitted on
DataLoaders, for notebooks and other training code.

    from torch.utils.data import DataLoader
    from uqlora import Laplace, load_backbone, load_data

    bb = load_backbone("smollm2_135m", data="arc_e", adapter="path/or/hub-id", head="lm_cloze")
    splits = load_data(bb, max_train_samples=256)                  # our records: {"train": [...], ...}
    train = DataLoader(splits["train"], batch_size=8, collate_fn=bb.collator)
    post = Laplace(bb, prior="marglik").fit(train)                 # any DataLoader of our or HF-tokenised batches
    probs = post.predict(next(iter(train)))                        # [B, C]
    post.save("laplace_run"); again = Laplace.load("laplace_run", bb)

It is the pipeline's own code, not a second implementation: the config is composed from ``conf/`` by Hydra
(the same yaml and schema defaults; keyword options are merged into the method's typed schema and checked by
:func:`uqlora.validate.validate_config`), the backbone is :func:`uqlora.build.make_backbone`'s, adapters are
read by :mod:`uqlora.models.peft_io`, a post-hoc method fits through its ``posthoc_fit`` over named splits (the
DataLoader given to ``fit`` is the split it fits on; others by name: ``fit(train, val=val_loader)``), a
trained method (MAP, SWAG, ...) through :func:`uqlora.fit.fit_member` with a Lightning trainer, and ``save``
writes a run directory (:class:`~uqlora.rundir.RunDir`: adapter, method state, ``adapter/`` in PEFT format,
``.hydra/config.yaml``) that ``load`` -- or ``eval.py run_dir=<it>`` -- restores.

Methods share the backbone they are given: training one (``MAP(bb).fit(...)``) changes ``bb``'s adapter for
every method built on it afterwards.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from uqlora.errors import UqloraError

GROUPS = ("optim", "loss", "train", "trainer", "eval", "data", "model")  # keyword options naming a config group


# --- config -----------------------------------------------------------------------------------------------
def compose(overrides: Iterable[str] = ()) -> DictConfig:
    """The config ``train.py`` would run with these command-line overrides (``logger=none`` unless given)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from uqlora.config import register_configs
    from uqlora.overrides import CONF_DIR, _one_line

    register_configs()
    overrides = ["logger=none", "progress_bar=none", "print_table=false", *overrides]
    try:
        if GlobalHydra.instance().is_initialized():
            return hydra_compose(config_name="config", overrides=overrides)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except Exception as e:
        raise UqloraError(_one_line(e)) from e


def _merged(node: DictConfig, value: dict, who: str, allow_new: bool = False) -> DictConfig:
    """``node`` with ``value`` merged in by OmegaConf: a typed (schema) node refuses unknown keys and values
    outside its enumerations; a plain one (``allow_new``: trainer arguments) takes new keys."""
    from uqlora.overrides import _one_line

    try:
        if allow_new:
            node = node.copy()
            OmegaConf.set_struct(node, False)
        return OmegaConf.merge(node, value)
    except Exception as e:
        raise UqloraError(f"{who}: {_one_line(e)}") from e


# --- backbone and data ------------------------------------------------------------------------------------
def load_backbone(model: str, data: str = "sst2", adapter: str | Path | None = None, head: str = "auto",
                  device: str | None = None, overrides: Iterable[str] = ()):
    """Our :class:`~uqlora.models.backbone.Backbone` for ``conf/model/<model>.yaml`` scoring ``data``'s task
    (classes, answer words), with the LoRA of ``adapter`` (a PEFT folder or hub id; its ``r`` / ``lora_alpha``
    / target modules become ``model.lora``) or a fresh one. It carries ``.tokenizer``, ``.collator`` (records
    -> batches: ``DataLoader(records, collate_fn=bb.collator)``) and ``.cfg`` (the composed config).
    ``device``: ``cpu`` | ``cuda`` (post-hoc fits and predictions; default: ``trainer.accelerator``). The LoRA
    initialisation follows ``seed`` (``train.init_seed``) as in ``train.py``."""
    import lightning.pytorch as pl

    from uqlora.build import init_seed, make_backbone
    from uqlora.data.datamodule import task_info
    from uqlora.data.prompts import Collator
    from uqlora.models.backbone import resolve_head
    from uqlora.models.peft_io import check_adapter, load_adapter, lora_settings, read_adapter, same_base
    from uqlora.validate import validate_config

    cfg = compose([f"model={model}", f"data={data}", *overrides])
    with open_dict(cfg):
        cfg.model.head = head
        if device is not None:
            cfg.trainer.accelerator = {"cuda": "gpu"}.get(str(device), str(device))
    found = read_adapter(adapter, "adapter") if adapter is not None else None
    if found is not None:  # the adapter decides the LoRA shape (the pipeline asks for it in model.lora instead)
        if same_base(found.base, cfg.model) is False:
            check_adapter(found, cfg.model, "adapter")  # another base model: one line naming both
        lora = {k: v for k, v in lora_settings(found).items() if k != "dropout"}
        cfg.model = _merged(cfg.model, {"lora": lora}, "load_backbone(adapter=...)")
    validate_config(cfg)
    if found is not None:
        check_adapter(found, cfg.model, "adapter")  # the rest of the checks, before the model loads
    info = task_info(cfg.data)
    pl.seed_everything(init_seed(cfg), workers=True, verbose=False)  # the LoRA initialisation, as build_member
    bb, tok = make_backbone(cfg, info, resolve_head(cfg.model, info.task))
    if found is not None:
        load_adapter(bb, found, cfg.model, "adapter")
    bb.tokenizer, bb.cfg = tok, cfg
    bb.collator = Collator(tok, bb.head_kind, info.task, info.num_classes, int(cfg.data.max_length),
                           cfg.data.get("prompt"), causal=cfg.model.kind == "causal",
                           cloze_impl=str(cfg.model.get("cloze_impl", "packed")))
    return bb


def load_data(backbone_or_data, seed: int = 0, **limits) -> dict[str, list[dict]]:
    """The carved splits (``train``, ``val``, ``calib``, ``test``; our records) of a backbone's data config or a
    ``conf/data`` name, as the pipeline carves them; ``limits``: ``max_train_samples=64``, ``calib_size=0.1``..."""
    from uqlora.data.datamodule import build_splits

    cfg = backbone_or_data.cfg if hasattr(backbone_or_data, "cfg") else compose([f"data={backbone_or_data}"])
    return build_splits(_merged(cfg.data, limits, "load_data"), int(seed))


def to_batch(backbone, items, labels=None) -> dict:
    """One batch from texts (classification: ``["great film", ...]``, formatted with the data config's prompt)
    or records (``{"text": ...}``, ``{"question": ..., "choices": [...]}``), through ``backbone.collator``;
    ``labels`` default to 0 where the items have none."""
    items = list(items)
    labels = list(labels) if labels is not None else [None] * len(items)
    records = []
    for i, (item, y) in enumerate(zip(items, labels)):
        rec = {"text": item} if isinstance(item, str) else dict(item)
        rec.setdefault("id", str(i))
        rec["label"] = int(y) if y is not None else int(rec.get("label", 0))
        records.append(rec)
    return backbone.collator(records)


def as_batch(batch, labels_required: bool = True) -> dict:
    """A batch of ours, or an HF-tokenised one (``BatchEncoding`` / dict with ``input_ids``, ``attention_mask``,
    ``labels`` or ``label``; right padding), as the dict the backbone scores."""
    b = dict(batch)
    if "labels" not in b and "label" in b:
        b["labels"] = b.pop("label")
    if "input_ids" not in b:
        raise UqloraError(f"a batch needs input_ids; got keys {sorted(b)}")
    ids = torch.as_tensor(b["input_ids"])
    b["input_ids"] = ids
    b["attention_mask"] = torch.as_tensor(b.get("attention_mask", torch.ones_like(ids)))
    if "labels" not in b:
        if labels_required:
            raise UqloraError("a batch to fit on needs labels ('labels' or 'label')")
        b["labels"] = torch.zeros(ids.shape[0], dtype=torch.long)
    b["labels"] = torch.as_tensor(b["labels"])
    m = b["attention_mask"]
    if m.dim() == 2 and bool((m[:, 1:] > m[:, :-1]).any()):
        raise UqloraError("a left-padded batch: the backbone reads the answer at the last non-pad token; "
                          "tokenize with tokenizer.padding_side='right'")
    return b


class Batches:
    """A DataLoader whose batches go through :func:`as_batch` (HF-tokenised loaders work unchanged)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return (as_batch(b) for b in self.loader)

    def __len__(self):
        return len(self.loader)


class LoaderSplits:
    """Named splits from DataLoaders, in the shape post-hoc fits and ``fit_member`` read (``has``, ``loader``,
    ``records``, ``train_dataloader`` / ``val_dataloader``)."""

    def __init__(self, loaders: dict, who: str):
        self.loaders = {k: Batches(v) for k, v in loaders.items() if v is not None}
        self.records = {k: range(len(v.dataset) if hasattr(v, "dataset") and hasattr(v.dataset, "__len__")
                                 else len(v)) for k, v in loaders.items() if v is not None}
        self.who = who

    def setup(self, stage=None) -> None:
        pass

    def has(self, split: str) -> bool:
        return split in self.loaders

    def missing(self, split: str) -> str:
        return f"{self.who} needs the '{split}' split: pass fit(..., {split}=<DataLoader>)"

    def loader(self, split: str, shuffle: bool = False):
        if split not in self.loaders:
            raise UqloraError(self.missing(split))
        return self.loaders[split]


def _datamodule(splits: LoaderSplits):
    import lightning.pytorch as pl

    class _DM(pl.LightningDataModule):
        def train_dataloader(self):
            return splits.loader("train")

        def val_dataloader(self):
            return splits.loaders.get("val", [])

    dm = _DM()
    dm.has, dm.loader, dm.missing, dm.records = splits.has, splits.loader, splits.missing, splits.records
    return dm


# --- methods ----------------------------------------------------------------------------------------------
class Method:
    """A registered uqlora method on a backbone: options from ``conf/method/<option>.yaml`` and its schema,
    keyword overrides checked by the same rules (``Laplace(bb, n_kfac=20, prior={"method": "val_nll"})``;
    a keyword naming a config group -- ``optim``, ``trainer``, ``loss``, ``train``, ``eval`` -- is merged
    there: ``SWAG(bb, trainer={"max_steps": 50}, optim={"lr": 1e-3})``)."""

    option = ""                 # the conf/method option (``laplace_ll`` is Laplace with subset=last_layer)
    aliases: dict[str, str] = {}  # scalar shorthands: Laplace(bb, prior="marglik") -> prior.method

    def __init__(self, backbone, option: str | None = None, base: "Method | None" = None, **options):
        from uqlora.methods import get_method
        from uqlora.validate import validate_config

        option = option or self.option
        if not option:
            raise UqloraError("Method(bb, option=...): name a conf/method option, e.g. 'laplace'")
        cfg, who = backbone.cfg.copy(), type(self).__name__
        node = compose([f"method={option}"]).method
        for key, value in options.items():
            if key in GROUPS:
                cfg[key] = _merged(cfg[key], value, who, allow_new=key == "trainer")
            elif key in self.aliases and not isinstance(value, dict):
                group, _, leaf = self.aliases[key].partition(".")
                node = _merged(node, {group: {leaf: value}}, who)
            else:
                node = _merged(node, {key: value}, who)
        with open_dict(cfg):
            cfg.method = node
        validate_config(cfg)
        self.option, self.backbone, self.cfg = option, backbone, cfg
        self.method = get_method(str(cfg.method.name))(backbone, cfg)
        if base is not None:
            self.method.attach_base(base.method)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(option={self.option!r}, fitted={self.method.fitted})"

    # --- fitting ----------------------------------------------------------------------------------------
    def fit(self, loader, workdir: str | Path | None = None, **splits) -> "Method":
        """Fit on ``loader``. A post-hoc method: ``loader`` is the split it fits on (Laplace: train, temperature:
        calib, ...), other splits it reads by name (``val=...``). A trained method: trained on ``loader`` with a
        Lightning trainer (``cfg.trainer``), validated on ``val`` (the best adapter by validation loss is kept),
        its checkpoints in ``workdir`` (a temporary folder by default)."""
        from uqlora.methods.posthoc import PostHocMethod

        m = self.method
        if isinstance(m, PostHocMethod):
            m.posthoc_fit(LoaderSplits({m.fit_split: loader, **splits}, type(self).__name__))
            return self
        from uqlora.fit import fit_member
        from uqlora.rundir import RunDir

        with open_dict(self.cfg):
            self.cfg.data.batch_size = int(getattr(loader, "batch_size", None) or self.cfg.data.batch_size)
            if splits.get("val") is None:
                self.cfg.trainer.limit_val_batches = 0
        dm = _datamodule(LoaderSplits({"train": loader, **splits}, type(self).__name__))
        run = RunDir(workdir or tempfile.mkdtemp(prefix="uqlora_fit_"))
        m.train()  # the Trainer keeps the mode it finds (an earlier prediction left eval mode)
        fit_member(self.cfg, m, dm, run, False, {}, "")
        return self

    # --- prediction -------------------------------------------------------------------------------------
    def _predicting(self):
        m = self.method
        m.require_fitted()
        device = m.fit_device()
        m.to(device).eval()
        return m, device

    def outputs(self, batch) -> dict[str, torch.Tensor]:
        """Everything the method predicts for one batch (on the CPU): ``probs [B, C]``, ``labels``, and for
        sampling methods ``samples [S, B, C]``, for AdUE the ``u_*`` scores."""
        m, device = self._predicting()
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in as_batch(batch, False).items()}
        m.start_predict()
        try:
            with torch.no_grad(), m.autocast(device):
                out = m.predict_step(b, 0)
        finally:
            m.end_predict()
        return {k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()) if torch.is_tensor(v) else v
                for k, v in out.items()}

    def predict(self, batch) -> torch.Tensor:
        """The predictive probabilities ``[B, C]`` of one batch."""
        return self.outputs(batch)["probs"]

    def predict_loader(self, loader) -> dict:
        """The outputs over a whole DataLoader as numpy arrays (``probs [N, C]``, ``labels [N]``, ...), the
        weight draws of sampling methods shared by every batch, as in the pipeline's evaluation."""
        from uqlora.predict import concat_outputs

        m, device = self._predicting()
        outs = []
        m.start_predict()
        try:
            for i, batch in enumerate(Batches(loader)):
                b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with torch.no_grad(), m.autocast(device):
                    outs.append({k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in m.predict_step(b, i).items()})
        finally:
            m.end_predict()
        return concat_outputs(outs)

    # --- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """A run directory at ``path``: the adapter (ours and PEFT format), the fitted method state, the config."""
        from uqlora.io import atomic_write
        from uqlora.rundir import RunDir
        from uqlora.sources import export_member

        run = RunDir(path)
        run.save_adapter(self.backbone.trainable_state_dict())
        run.save_method_state(self.method.method_state_dict())
        export_member(self.cfg, self.method, run)
        atomic_write(run.path / ".hydra" / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(self.cfg).encode()))
        return run.path

    @classmethod
    def load(cls, path: str | Path, backbone) -> "Method":
        """A method saved by :meth:`save` (or a finished single-model run directory of train.py) on ``backbone``:
        its adapter and fitted state; another model's is refused in one line."""
        from uqlora.methods import get_method
        from uqlora.rundir import RunDir
        from uqlora.sources import restore_member

        run = RunDir(path)
        saved = run.config()
        obj = cls.__new__(cls)
        obj.cfg = backbone.cfg.copy()
        with open_dict(obj.cfg):
            obj.cfg.method = saved.method
        obj.option, obj.backbone = run.hydra_choice("method") or cls.option or str(saved.method.name), backbone
        obj.method = get_method(str(saved.method.name))(backbone, obj.cfg)
        restore_member(obj.cfg, obj.method, run.members()[0])
        return obj


def make_method(option: str, backbone, **options) -> Method:
    """Any ``conf/method`` option by name: ``make_method("tfb", bb, num_samples=4)``."""
    return Method(backbone, option=option, **options)


class MAP(Method):
    option = "map"


class Laplace(Method):
    option = "laplace"
    aliases = {"prior": "prior.method"}


class LLLA(Laplace):
    option = "laplace_ll"


class Temperature(Method):
    option = "temperature"


class AdUE(Method):
    option = "adue"


class SWAG(Method):
    option = "swag"


class MCDropout(Method):
    option = "mc_dropout"
