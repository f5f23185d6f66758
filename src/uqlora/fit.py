"""Fit one member: train it (methods that train; resumable from ``last.ckpt``; from a PEFT adapter with
``train.init_adapter``) or load a finished run's adapter (``method.map_run``) or a PEFT adapter
(``method.adapter``), restore its best adapter, run its post-hoc stage, save adapter (also in PEFT format,
``adapter/``) and state."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from uqlora.build import build_trainer
from uqlora.callbacks import BestAdapterCheckpoint, CalibrationCallback
from uqlora.callbacks.rng import RNGStateCheckpoint
from uqlora.context import RunContext
from uqlora.logging_utils import log_summary
from uqlora.rundir import RunDir
from uqlora.runs import carry_best_adapter
from uqlora.sources import RunAccess, attach_adapter, attach_source, export_member, restore_member

log = logging.getLogger(__name__)


def fit_callbacks(cfg, method, member_dir: RunDir) -> tuple[BestAdapterCheckpoint, list]:
    ckpt = BestAdapterCheckpoint(member_dir.checkpoints, monitor=cfg.train.get("monitor", "val/loss"))
    callbacks = [ckpt, CalibrationCallback(member_dir.path / "plots", n_bins=int(cfg.eval.get("n_bins", 15))),
                 RNGStateCheckpoint()]
    callbacks += method.extra_callbacks(member_dir.path)
    if cfg.train.get("early_stopping_patience"):
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks.append(EarlyStopping(monitor=ckpt.monitor, patience=int(cfg.train.early_stopping_patience)))
    if cfg.train.get("save_last", True):
        from lightning.pytorch.callbacks import ModelCheckpoint

        every = cfg.train.get("checkpoint_every_n_steps")
        callbacks.append(ModelCheckpoint(dirpath=member_dir.checkpoints, filename="last", save_top_k=1,
                                         every_n_train_steps=int(every) if every else None,
                                         save_on_train_epoch_end=True, enable_version_counter=False))
    return ckpt, callbacks


def fit_member(cfg, method, dm, member_dir: RunDir, logger, timings: dict, key: str, member: int = 0,
               ckpt_path: str | None = None, ctx: RunContext | None = None, reuse: RunDir | None = None) -> dict:
    """Fit one member and save its adapter and method state; returns ``{"trainer": ..., **info}``. ``reuse``: a
    finished run's member that is this member (same config and seed: ``sources.sweep_first_member``), loaded
    instead of trained."""
    ckpt, callbacks = fit_callbacks(cfg, method, member_dir)
    n_batches = -(-len(dm.records["train"]) // int(cfg.data.batch_size))
    trainer = build_trainer(cfg, member_dir.path, logger, callbacks, n_train_batches=n_batches, ctx=ctx)
    info: dict = {}
    if cfg.method.get("map_run"):
        info["map_run"] = attach_source(cfg, method, member)
    elif cfg.method.get("adapter"):
        info.update(attach_adapter(cfg, method, "method.adapter"))
    elif reuse is not None:
        restore_member(cfg, method, reuse)
        info["reused_run"] = str(reuse.path)
    elif method.trains:
        info.update(_train(cfg, method, dm, trainer, ckpt, ckpt_path, member_dir, timings, key))
    member_dir.save_adapter(method.backbone.trainable_state_dict())
    export_member(cfg, method, member_dir)
    t0 = time.perf_counter()
    method.posthoc_fit(dm)
    timings[f"posthoc_fit{key}"] = round(time.perf_counter() - t0, 3)
    member_dir.save_method_state(method.method_state_dict())
    if getattr(method, "tuning", None):
        info["posthoc"] = dict(method.tuning)
        log_summary(logger, {f"posthoc{key}/{k}": (v[0] if isinstance(v, list) and len(v) == 1 else v)
                             for k, v in method.tuning.items() if isinstance(v, (int, float, list))})
    return {"trainer": trainer, **info}


def _train(cfg, method, dm, trainer, ckpt, ckpt_path, member_dir: RunDir, timings: dict, key: str) -> dict:
    info: dict = {}
    if cfg.train.get("init_adapter") and not ckpt_path:
        info.update(attach_adapter(cfg, method, "train.init_adapter"))
    method.prepare_fit(dm, RunAccess(cfg))
    t0 = time.perf_counter()
    if ckpt_path:
        carry_best_adapter(Path(ckpt_path), ckpt.path)
        log.info("resuming %s from %s", member_dir.path, ckpt_path)
        info["resumed_from"] = str(ckpt_path)
    trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    timings[f"fit{key}"] = round(time.perf_counter() - t0, 3)
    want_best = method.restore_best_after_fit and bool(cfg.train.get("restore_best", True))
    restored = want_best and ckpt.restore_best(method)
    if want_best and not restored:
        log.warning("no validation ran during training; reporting the final adapter")
    history = next((c.history for c in trainer.callbacks if isinstance(c, CalibrationCallback)), [])
    return {**info, "steps": int(trainer.global_step), "val_history": history, "best_val_loss": ckpt.best if ckpt.best_step >= 0 else None,
            "best_step": ckpt.best_step if ckpt.best_step >= 0 else None, "restored_best": bool(restored),
            "final_train_loss": float(trainer.callback_metrics.get("train/loss_epoch", float("nan")))}
