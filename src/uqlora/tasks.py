"""The two tasks behind ``train.py`` and ``eval.py``.

``train(cfg, ctx)``: data -> M members (each: backbone + method, fit or a finished run's adapter, post-hoc fit,
predictions) -> the members pooled -> metrics, plots, logger -> the run directory (:mod:`uqlora.rundir`).
``evaluate_run(ecfg, ctx)``: the same from saved run directories, without training.

Both are plain functions returning ``(metrics, objects)``; the entry points pass the run directory and Hydra's
choices in a :class:`~uqlora.context.RunContext`, so tests and notebooks call them the same way.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from uqlora.build import Task, build_member, build_trainer, data_files, init_seed, load_task
from uqlora.context import RunContext
from uqlora.data.datamodule import task_info
from uqlora.errors import UqloraError
from uqlora.fit import fit_member
from uqlora.logging_utils import build_logger, log_results_table
from uqlora.methods import get_method
from uqlora.models.backbone import resolve_head
from uqlora.predict import pool_splits, predict_member
from uqlora.report import print_table, report, write_results
from uqlora.rundir import RunDir
from uqlora.runs import archive_run, check_same_config, read_results, record_failure, restore_hydra_files, resume_points
from uqlora.sources import (check_adapter_source, export_member, pooled_method, restore_member, sweep_first_member,
                            sweep_map_run)
from uqlora.validate import validate_config

log = logging.getLogger(__name__)


def train(cfg: DictConfig, ctx: RunContext | None = None):
    """Fit (M members), post-hoc fit, evaluate and write the run directory. Returns ``(metrics, objects)``.

    The run directory decides what happens first: one that already holds a complete ``results.json`` is
    skipped (``skip_complete``; re-running a sweep skips its finished members), one that holds an
    unfinished run's ``checkpoints/last.ckpt`` is continued when ``resume=true`` (and refused otherwise).
    A run that fails writes ``results.json`` with ``status: failed`` and the error before re-raising."""
    ctx = ctx or RunContext.for_config(cfg)
    run_dir = ctx.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    validate_config(cfg)  # before the directory is touched: an impossible value changes nothing
    check_adapter_source(cfg)  # so is a PEFT adapter of another base model (read, not loaded into a model)
    sweep_map_run(cfg, run_dir)  # train.reuse_map: the sweep's MAP run of this cell (before the skip check,
    previous = read_results(run_dir)  # which compares the resolved config with the saved one)
    if previous is not None and previous.get("status", "complete") == "complete":
        if cfg.get("skip_complete", True):
            return _skip_complete(cfg, run_dir, previous)
        archive_run(run_dir)
    elif previous is not None and not cfg.get("skip_complete", True) and not cfg.get("resume", False):
        archive_run(run_dir)  # a failed run re-run from scratch (resume=true would continue its checkpoint)
    M = int(cfg.method.get("num_models", 1))
    if M > 1 and cfg.train.get("ckpt_path") not in (None, "last"):
        raise UqloraError("train.ckpt_path resumes a single model; resume ensemble members one run at a time")
    resume_from = resume_points(cfg, run_dir, max(M, 1))  # refusals here leave the directory as it was
    try:
        return _train(cfg, ctx, resume_from)
    except Exception as e:
        record_failure(run_dir, cfg, e, ctx.method_label(cfg))
        raise


def _skip_complete(cfg: DictConfig, run_dir: Path, previous: dict):
    """A run directory that already holds complete results (a re-run sweep member): report them, do nothing."""
    check_same_config(run_dir, previous.get("config") or {}, cfg, "skip (skip_complete=true)")
    log.info("skipping %s: it already holds a complete results.json (skip_complete=false re-runs it)", run_dir)
    restore_hydra_files(run_dir)  # Hydra rewrote .hydra/ for this invocation; the directory keeps its own
    print(f"skipped (complete results): {run_dir}", flush=True)
    if cfg.get("print_table", True):
        print_table(previous, run_dir)
    return previous["metrics"], {"run_dir": run_dir, "results": previous, "skipped": True}


def _train(cfg: DictConfig, ctx: RunContext, resume_from: list[str | None]):
    t_start = time.perf_counter()
    run_dir = RunDir(ctx.run_dir)
    M = int(cfg.method.get("num_models", 1))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    files = data_files(cfg)
    task = load_task(cfg)
    timings["data"] = round(time.perf_counter() - t0, 3)
    logger = build_logger(cfg, run_dir.path, ctx.choices)
    member_preds, members = [], []
    seed0 = init_seed(cfg)
    first = sweep_first_member(cfg, run_dir.path) if M > 1 else None  # train.reuse_map: a finished MAP / SWAG run
    for m in range(M):
        key = "" if M == 1 else f"_member{m}"
        method, dm = build_member(cfg, task, seed0 + m)
        fitted = fit_member(cfg, method, dm, run_dir.member(m, M), logger, timings, key, member=m,
                            ckpt_path=resume_from[m], ctx=ctx, reuse=first.members()[0] if first and m == 0 else None)
        trainer = fitted.pop("trainer")
        member_preds.append(predict_member(cfg, method, dm, trainer, timings, key, m, M))
        members.append({"init_seed": seed0 + m, **fitted})
    metrics = report(cfg, run_dir.path, pool_splits(member_preds), logger, method.probability_scores)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    extra = {"status": "complete", "splits": {k: len(v) for k, v in task.records.items()}, "num_models": M,
             "train": members[0] if M == 1 else members, "data_files": files}
    results = write_results(run_dir.path, cfg, metrics, timings, extra, ctx.method_label(cfg))
    log_results_table(logger, results)
    if cfg.get("print_table", True):
        print_table(results, run_dir.path)
    return metrics, {"method": method, "datamodule": dm, "trainer": trainer, "run_dir": run_dir.path,
                     "results": results}


def evaluate_run(ecfg: DictConfig, ctx: RunContext | None = None):
    """Re-evaluate finished run directories from their saved adapters and method states, without retraining:
    ``run_dir`` (one run, all of its members) or ``ensemble=[dir1, dir2, ...]`` (runs pooled, e.g. the
    members of a multirun). Optionally on another data config; writes into a fresh directory.
    ``from_predictions=true``: pool the runs' saved predictions instead of re-running their models.
    ``export=<folder>``: write the run's adapter in PEFT format there instead (:func:`export_run`)."""
    if ecfg.get("export"):
        return export_run(ecfg)
    t_start = time.perf_counter()
    ctx = ctx or RunContext.for_config(ecfg)
    sources = [RunDir(d) for d in (ecfg.get("ensemble") or [ecfg.run_dir])]
    cfgs = [s.config() for s in sources]
    cfg = cfgs[0]
    for other, src in zip(cfgs[1:], sources[1:]):
        for key in ("model", "data"):
            if OmegaConf.to_container(other[key]) != OmegaConf.to_container(cfg[key]):
                raise UqloraError(f"ensemble member '{src.path}' has a different {key} config than '{sources[0].path}'")
    saved = bool(ecfg.get("from_predictions", False))
    if saved:
        for key in ("data", "ood"):
            if ecfg.get(key) is not None:
                raise UqloraError(f"from_predictions=true pools the runs' saved predictions on their own data; {key}="
                                  f"{ecfg.get(key) if key == 'ood' else ecfg.data.name} needs the models re-run "
                                  f"(from_predictions=false)")
    if ecfg.get("data") is not None:
        cfg.data = ecfg.data
    if ecfg.get("ood") is not None:  # OOD detection against another dataset; the run's own splits are unchanged
        cfg.data.ood = str(ecfg.ood)
        cfg.data.ood_options = ecfg.get("ood_options") or {}
        cfg.data.max_ood_samples = ecfg.get("max_ood_samples")
    for key in ("eval", "logger"):
        given = _given(OmegaConf.to_container(ecfg[key], resolve=True)) if ecfg.get(key) is not None else None
        if given:
            cfg[key] = OmegaConf.merge(cfg.get(key) or {}, given)
    validate_config(cfg)
    out_dir = ctx.run_dir
    files = data_files(cfg)
    logger = build_logger(cfg, out_dir, ctx.choices) if ecfg.get("log", False) else False
    timings: dict[str, float] = {}
    if saved:
        member_preds, method, dm = saved_predictions(sources, list(cfg.eval.splits)), None, None
        n_members = sum(int((src.results() or {}).get("num_models", 1)) for src in sources)
        scores = get_method(cfg.method.name).probability_scores
    else:
        member_preds, method, dm = _predict_sources(cfg, ctx, sources, cfgs, logger, timings)
        n_members, scores = len(member_preds), method.probability_scores
    metrics = report(cfg, out_dir, pool_splits(member_preds), logger, scores)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    rcfg, label = cfg, sources[0].method_label()
    if len(sources) > 1:  # separate runs pooled: an ensemble of them, not one more run of their method
        rcfg, label = pooled_method(cfg, label, n_members)
    results = write_results(out_dir, rcfg, metrics, timings,
                            {"source_runs": [str(s.path) for s in sources], "num_models": n_members,
                             "from_predictions": saved, "data_files": files}, label)
    log_results_table(logger, results)
    if ecfg.get("print_table", True):
        print_table(results, out_dir)
    return metrics, {"method": method, "datamodule": dm, "run_dir": out_dir, "results": results}


def _predict_sources(cfg, ctx, sources, cfgs, logger, timings):
    """Every member of every source run rebuilt from its saved adapter and method state and run on the
    evaluation splits: ``([{split: prediction}] per member, the last method, its datamodule)``."""
    task = load_task(cfg)
    member_preds = []
    n_members = sum(len(src.members()) for src in sources)
    for src, src_cfg in zip(sources, cfgs):
        src_cfg.data = cfg.data
        # one model per source run: its members differ only in the adapter and method state loaded below
        method, dm = build_member(src_cfg, task, init_seed(src_cfg))
        trainer = build_trainer(cfg, ctx.run_dir, logger, [], ctx=ctx)
        for mdir in src.members():
            restore_member(src_cfg, method, mdir)
            member_preds.append(predict_member(cfg, method, dm, trainer, timings, f"_{len(member_preds)}",
                                               len(member_preds), n_members))
    return member_preds, method, dm


def saved_predictions(sources: list[RunDir], splits: list[str]) -> list[dict[str, dict]]:
    """``from_predictions=true``: each source run's own saved predictions (``predictions/<split>.npz``) on
    ``splits`` (+ ``ood`` where the first run scored one), in place of re-running its models. Pooling them is
    the pooling of their members' draws (every run saved its samples, or its probs as one), so the result
    equals the re-run pool's for runs whose evaluation reproduces (tests/test_swag.py) -- at no forward pass."""
    if (sources[0].predictions_path("ood")).is_file():
        splits = [*splits, "ood"]
    out = []
    for src in sources:
        status = src.status()
        if status != "complete":
            raise UqloraError(f"run '{src.path}' is {status}, not complete: its predictions cannot be pooled")
        missing = [s for s in splits if not src.predictions_path(s).is_file()]
        if missing:
            raise UqloraError(f"run '{src.path}' saved no predictions for split(s) {', '.join(missing)} (saved: "
                              f"{', '.join(sorted(p.stem for p in (src.path / 'predictions').glob('*.npz'))) or 'none'}"
                              f"); pool it with from_predictions=false, which re-runs the models")
        out.append({s: src.predictions(s) for s in splits})
    return out


def _given(node):
    """The values of an override node that were set (nulls dropped, recursively): what eval.py merges in."""
    if isinstance(node, dict):
        out = {k: _given(v) for k, v in node.items()}
        return {k: v for k, v in out.items() if v is not None and v != {}}
    return node


def export_run(ecfg: DictConfig):
    """``eval.py run_dir=<run> export=<folder>``: the run's saved adapter in PEFT format in ``folder`` (a
    multi-member run: ``folder/members/<m>``), for runs made before every run wrote ``adapter/``."""
    src = RunDir(ecfg.run_dir)
    cfg = src.config()
    info = task_info(cfg.data)
    method, _ = build_member(cfg, Task(info, resolve_head(cfg.model, info.task), {}), init_seed(cfg))
    dirs, out = src.members(), Path(str(ecfg.export))
    written = []
    for m, mdir in enumerate(dirs):
        method.backbone.load_trainable_state_dict(mdir.adapter())
        folder = out if len(dirs) == 1 else out / "members" / str(m)
        written.append(str(export_member(cfg, method, mdir, folder, strict=True)))
    print(f"exported the adapter of {src.path} in PEFT format: {', '.join(written)}", flush=True)
    return {}, {"run_dir": src.path, "exported": written}
