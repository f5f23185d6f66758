"""The task functions behind ``train.py`` and ``eval.py``.

``train(cfg)``: load data and backbone -> fit (methods that train) -> restore the best adapter ->
post-hoc fit on the calib split -> predict every evaluation split -> metrics -> run directory:

    .hydra/config.yaml        the composed config (written by Hydra)
    results.json              metrics per split, timings, versions, git commit, seed
    predictions/<split>.npz   probs, labels, ids (and samples for sampling methods)
    plots/reliability_<split>.png
    checkpoints/adapter.pt    LoRA + head tensors used for the reported numbers
    checkpoints/method_state.pt   the method's fitted post-hoc state (may be empty)

Both are plain functions returning ``(metrics, objects)`` so tests and notebooks can call them.
"""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from uqlora.callbacks import BestAdapterCheckpoint, CalibrationCallback
from uqlora.data.datamodule import UQDataModule, build_splits, task_info
from uqlora.data.prompts import answer_words
from uqlora.errors import UqloraError
from uqlora.io import atomic_json, atomic_npz, atomic_torch_save
from uqlora.logging_utils import build_logger, log_image, log_summary, log_table
from uqlora.methods import get_method
from uqlora.metrics import evaluate_ood, evaluate_predictions, reliability_bins, reliability_diagram
from uqlora.models.backbone import build_backbone, resolve_head
from uqlora.models.loading import load_pretrained

log = logging.getLogger(__name__)
TABLE_KEYS = ("acc", "ece", "nll", "brier")


def setup(cfg: DictConfig):
    """Backbone (model + LoRA + head), method module and datamodule for a config."""
    info = task_info(cfg.data)
    head = resolve_head(cfg.model, info.task)
    records = build_splits(cfg.data, int(cfg.seed))  # data first: a missing folder fails before the model loads
    model, tok = load_pretrained(cfg.model)
    words = answer_words(cfg.data.get("prompt"), info.task, info.num_classes, info.label_names)
    backbone = build_backbone(cfg.model, head, info.num_classes, answer_words=words, tokenizer=tok, model=model)
    method = get_method(cfg.method.name)(backbone, cfg)
    dm = UQDataModule(cfg.data, tok, head, causal=cfg.model.kind == "causal", seed=int(cfg.seed), records=records)
    return method, dm


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks, n_train_batches: int = 0) -> pl.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar

    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    vci = t.get("val_check_interval")
    if n_train_batches and isinstance(vci, int) and vci > n_train_batches:
        log.info("trainer.val_check_interval=%d > %d batches per epoch: validating at each epoch end", vci,
                 n_train_batches)
        t["val_check_interval"] = 1.0
    cbs = list(callbacks)
    if cfg.get("progress_bar", "rich") == "rich":
        cbs.append(RichProgressBar(leave=True))
    if logger:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    return pl.Trainer(logger=logger, callbacks=cbs, default_root_dir=str(run_dir), enable_checkpointing=False,
                      enable_progress_bar=cfg.get("progress_bar", "rich") != "none", **t)


def predict(trainer: pl.Trainer, method, dm: UQDataModule, split: str) -> dict[str, np.ndarray]:
    outs = trainer.predict(method, dataloaders=dm.loader(split))
    res = {k: torch.cat([o[k] for o in outs], dim=1 if k == "samples" else 0).cpu().numpy() for k in outs[0]}
    res["ids"] = np.array([str(r["id"]) for r in dm.records[split]])
    return res


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("uqlora", "torch", "lightning", "transformers", "peft", "hydra-core", "torchmetrics", "wandb"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                                    timeout=5).stdout.strip())
        return {"commit": commit or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def evaluate_splits(cfg, run_dir: Path, method, dm, trainer, logger, timings: dict) -> dict:
    """Predict, score, save predictions and plots, log to the logger; returns metrics per split."""
    n_bins = int(cfg.eval.get("n_bins", 15))
    splits = [s for s in cfg.eval.splits if dm.has(s)]
    preds, metrics = {}, {}
    for split in splits + (["ood"] if dm.has("ood") else []):
        t0 = time.perf_counter()
        preds[split] = predict(trainer, method, dm, split)
        timings[f"predict_{split}"] = round(time.perf_counter() - t0, 3)
        if cfg.eval.get("save_predictions", True):
            atomic_npz(run_dir / "predictions" / f"{split}.npz", **preds[split])
    for split in splits:
        p = preds[split]
        m = evaluate_predictions(p["probs"], p["labels"], n_bins=n_bins, samples=p.get("samples"))
        if "ood" in preds:
            m.update(evaluate_ood(p["probs"], preds["ood"]["probs"], samples_in=p.get("samples"),
                                  samples_out=preds["ood"].get("samples")))
        metrics[split] = m
        plot = reliability_diagram(p["probs"], p["labels"], run_dir / "plots" / f"reliability_{split}.png",
                                   n_bins=n_bins, title=f"{cfg.method.name} / {cfg.model.name} / {cfg.data.name}: {split}")
        log_image(logger, f"{split}/reliability", plot)
        bins = reliability_bins(p["probs"], p["labels"], n_bins=n_bins)
        rows = [[float(bins["edges"][i]), float(bins["edges"][i + 1]), float(bins["confidence"][i]),
                 float(bins["accuracy"][i]), int(bins["count"][i])] for i in range(n_bins)]
        log_table(logger, f"{split}/calibration_table", ["bin_lo", "bin_hi", "confidence", "accuracy", "count"], rows)
        log_summary(logger, {f"{split}/{k}": v for k, v in m.items()})
    return metrics


def _run_dir(cfg) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside @hydra.main (tests, notebooks)
        return Path(cfg.get("run_dir") or "outputs/manual")


def write_results(run_dir: Path, cfg, metrics: dict, timings: dict, extra: dict | None = None) -> dict:
    results = {
        "method": cfg.method.name, "model": cfg.model.name, "data": cfg.data.name, "seed": int(cfg.seed),
        "run_dir": str(run_dir), "metrics": metrics, "timings": timings, **(extra or {}),
        "versions": _versions(), "git": _git(), "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_json(results, run_dir / "results.json")
    return results


def print_table(results: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['method']} | {results['model']} | {results['data']} | seed {results['seed']}")
    table.add_column("split")
    for k in TABLE_KEYS:
        table.add_column(k.upper(), justify="right")
    for split, m in results["metrics"].items():
        table.add_row(split, *(f"{100 * m[k]:.1f}%" if k in ("acc", "ece") else f"{m[k]:.3f}" for k in TABLE_KEYS))
    Console().print(table)
    for split in results["metrics"]:  # plain print: paths must not be wrapped
        print(f"reliability diagram ({split}): {run_dir / 'plots' / f'reliability_{split}.png'}")
    print(f"results: {run_dir / 'results.json'}", flush=True)


def train(cfg: DictConfig):
    """Fit, post-hoc fit, evaluate and write the run directory. Returns ``(metrics, objects)``."""
    t_start = time.perf_counter()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    method, dm = setup(cfg)
    dm.setup()
    timings["setup"] = round(time.perf_counter() - t0, 3)
    logger = build_logger(cfg, run_dir)
    ckpt = BestAdapterCheckpoint(run_dir / "checkpoints", monitor=cfg.train.get("monitor", "val/loss"))
    callbacks = [ckpt, CalibrationCallback(run_dir / "plots", n_bins=int(cfg.eval.get("n_bins", 15)))]
    if cfg.train.get("early_stopping_patience"):
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks.append(EarlyStopping(monitor=ckpt.monitor, patience=int(cfg.train.early_stopping_patience)))
    n_batches = -(-len(dm.records["train"]) // int(cfg.data.batch_size))
    trainer = build_trainer(cfg, run_dir, logger, callbacks, n_train_batches=n_batches)
    extra: dict = {"splits": {k: len(v) for k, v in dm.records.items()}}
    if method.trains:
        t0 = time.perf_counter()
        trainer.fit(method, datamodule=dm)
        timings["fit"] = round(time.perf_counter() - t0, 3)
        restored = ckpt.restore_best(method)
        extra["train"] = {"steps": int(trainer.global_step), "best_val_loss": ckpt.best if restored else None,
                          "best_step": ckpt.best_step if restored else None,
                          "final_train_loss": float(trainer.callback_metrics.get("train/loss_epoch", float("nan")))}
        if not restored:
            log.warning("no validation ran during training; reporting the final adapter")
    atomic_torch_save(method.backbone.trainable_state_dict(), run_dir / "checkpoints" / "adapter.pt")
    t0 = time.perf_counter()
    method.posthoc_fit(dm)
    timings["posthoc_fit"] = round(time.perf_counter() - t0, 3)
    atomic_torch_save(method.method_state_dict(), run_dir / "checkpoints" / "method_state.pt")
    metrics = evaluate_splits(cfg, run_dir, method, dm, trainer, logger, timings)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    results = write_results(run_dir, cfg, metrics, timings, extra)
    if cfg.get("print_table", True):
        print_table(results, run_dir)
    return metrics, {"method": method, "datamodule": dm, "trainer": trainer, "run_dir": run_dir, "results": results}


def load_run_config(run_dir: str | Path) -> DictConfig:
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise UqloraError(f"'{run_dir}' is not a run directory (no .hydra/config.yaml)")
    return OmegaConf.load(path)


def evaluate_run(ecfg: DictConfig):
    """Re-evaluate a finished run directory (``eval.py``) from its saved adapter and method state,
    optionally on another data config, writing into a fresh ``eval/`` sub-directory."""
    t_start = time.perf_counter()
    src = Path(ecfg.run_dir)
    cfg = load_run_config(src)
    if ecfg.get("data") is not None:
        cfg.data = ecfg.data
    for key in ("eval", "logger"):
        if ecfg.get(key) is not None:
            cfg[key] = OmegaConf.merge(cfg.get(key) or {}, ecfg[key])
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out_dir = _run_dir(ecfg)
    method, dm = setup(cfg)
    adapter = src / "checkpoints" / "adapter.pt"
    if not adapter.is_file():
        raise UqloraError(f"run directory '{src}' has no checkpoints/adapter.pt")
    method.backbone.load_trainable_state_dict(torch.load(adapter, weights_only=True, map_location="cpu"))
    state = src / "checkpoints" / "method_state.pt"
    method.load_method_state_dict(torch.load(state, weights_only=True, map_location="cpu") if state.is_file() else {})
    logger = build_logger(cfg, out_dir) if ecfg.get("log", False) else False
    trainer = build_trainer(cfg, out_dir, logger, [])
    timings: dict[str, float] = {}
    metrics = evaluate_splits(cfg, out_dir, method, dm, trainer, logger, timings)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    results = write_results(out_dir, cfg, metrics, timings, {"source_run": str(src)})
    if ecfg.get("print_table", True):
        print_table(results, out_dir)
    return metrics, {"method": method, "datamodule": dm, "run_dir": out_dir, "results": results}
