"""The life cycle of a run directory (:class:`uqlora.rundir.RunDir`): complete, failed, unfinished
(resumable) or fresh.

* ``results.json`` is written atomically and carries ``status``: ``complete`` (metrics present) or
  ``failed`` (with the one-line ``error``; the traceback is in ``error.log``). A truncated or unreadable file
  counts as absent, never as a result.
* ``run_config.json`` is the resolved config as the run first started; resuming or skipping compares the new
  config against it (or against the config in ``results.json``), so a directory is never continued or
  reported under a config it was not run with.
* ``checkpoints/last.ckpt`` (``members/<m>/checkpoints/last.ckpt`` for ensembles) is where an unfinished run
  resumes from.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from uqlora.errors import UqloraError
from uqlora.io import atomic_json, atomic_write
from uqlora.rundir import CONFIG_SNAPSHOT, RunDir, is_complete

log = logging.getLogger(__name__)
# keys that may differ without changing what a run computes: presentation / location only (skip_complete
# compares with these; train.reuse_map only says where method.map_run came from, and that is compared) ...
PRESENTATION = ("resume", "skip_complete", "progress_bar", "print_table", "run_dir", "paths", "logger", "method.display_name",
                "data.num_workers", "data.data_dir", "optimized_metric", "train.reuse_map")
# ... and, for resuming, a longer schedule (extending a run is what resume is often for)
RESUMABLE = PRESENTATION + ("train.ckpt_path", "trainer.max_epochs", "trainer.max_steps")


def _rank0() -> bool:
    from uqlora.distributed import is_global_zero

    return is_global_zero()


def read_results(run_dir: Path) -> dict | None:
    """``results.json`` of a run directory, or None when absent, truncated or not a results file."""
    return RunDir(run_dir).results()


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict, new: dict, allowed: tuple[str, ...] = PRESENTATION) -> list[str]:
    """``key: old -> new`` for every differing key of two resolved configs outside ``allowed``."""
    a, b = _flat(old), _flat(new)

    def volatile(k):
        return any(k == v or k.startswith(v + ".") for v in allowed)

    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if not volatile(k) and a.get(k, "<absent>") != b.get(k, "<absent>")]


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def check_same_config(run_dir: Path, old: dict, cfg: DictConfig, action: str,
                      allowed: tuple[str, ...] = PRESENTATION) -> None:
    diff = config_diff(old, resolved(cfg), allowed)
    if allowed is RESUMABLE:  # a schedule may grow, never shrink
        for key in ("max_epochs", "max_steps"):
            was, now = (old.get("trainer") or {}).get(key), cfg.trainer.get(key)
            if isinstance(was, int) and isinstance(now, int) and was > 0 and 0 < now < was:
                diff.append(f"trainer.{key}: {was!r} -> {now!r} (a resumed schedule may only grow)")
    if diff:
        restore_hydra_files(run_dir)
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise UqloraError(f"cannot {action} '{run_dir}': it was run with another config ({'; '.join(diff[:3])}{more}); "
                          "use a new directory (hydra.run.dir / hydra.sweep.dir)")


def snapshot_config(run_dir: Path, cfg: DictConfig, fresh: bool) -> None:
    """Write ``run_config.json`` (and keep Hydra's ``.hydra/*.yaml`` in ``.hydra/started/``) when a run starts
    from scratch; kept as they are when it resumes."""
    path = Path(run_dir) / CONFIG_SNAPSHOT
    if not _rank0():
        return
    if fresh or not path.is_file():
        atomic_json(resolved(cfg), path)
        hydra_dir = Path(run_dir) / ".hydra"
        for f in hydra_dir.glob("*.yaml"):
            (hydra_dir / "started").mkdir(exist_ok=True)
            shutil.copyfile(f, hydra_dir / "started" / f.name)


def restore_hydra_files(run_dir: Path) -> None:
    """Hydra rewrote ``.hydra/*.yaml`` for a command that is refused or skipped: put the run's own back."""
    started = Path(run_dir) / ".hydra" / "started"
    if not _rank0():
        return
    for f in started.glob("*.yaml"):
        shutil.copyfile(f, started.parent / f.name)


def last_checkpoints(run_dir: Path, num_models: int) -> list[Path | None]:
    dirs = [RunDir(run_dir).member(m, num_models).checkpoints for m in range(num_models)]
    return [d / "last.ckpt" if (d / "last.ckpt").is_file() else None for d in dirs]


def resume_points(cfg: DictConfig, run_dir: Path, num_models: int) -> list[str | None]:
    """The checkpoint each member resumes from (None: from scratch). ``train.ckpt_path=<file>`` resumes a
    single model from any run's checkpoint into this new directory; ``resume=true`` (or
    ``train.ckpt_path=last``) continues this directory's own unfinished run. A directory holding an unfinished
    run is never trained over from scratch."""
    explicit = cfg.train.get("ckpt_path")
    resume = bool(cfg.get("resume", False)) or explicit == "last"
    found = last_checkpoints(run_dir, num_models)
    if explicit not in (None, "last") and not (resume and any(found)):  # this directory's own progress wins
        path = Path(str(explicit))
        if not path.is_file():
            raise UqloraError(f"train.ckpt_path '{path}' does not exist (a run's checkpoints/last.ckpt)")
        if any(found):
            raise UqloraError(f"run directory '{run_dir}' holds an unfinished run ({next(p for p in found if p)}); "
                              "continue it with resume=true, or choose a new directory for train.ckpt_path")
        snapshot_config(run_dir, cfg, fresh=True)
        return [str(path)]
    if not resume:
        if any(found):
            raise UqloraError(f"run directory '{run_dir}' holds an unfinished run ({next(p for p in found if p)}); "
                              "continue it with resume=true, or choose a new directory")
        snapshot_config(run_dir, cfg, fresh=True)
        return [None] * num_models
    snap = Path(run_dir) / CONFIG_SNAPSHOT
    if snap.is_file():
        check_same_config(run_dir, json.loads(snap.read_text()), cfg, "resume", RESUMABLE)
    elif any(found):
        log.warning("resume: %s has no %s; trusting that the config is the same", run_dir, CONFIG_SNAPSHOT)
    snapshot_config(run_dir, cfg, fresh=not any(found))
    if not any(found):
        log.warning("resume=true but %s holds no checkpoints/last.ckpt: starting from scratch", run_dir)
    return [None if p is None else str(p) for p in found]


def carry_best_adapter(ckpt_path: Path, best_path: Path) -> None:
    """Resuming from another directory's checkpoint: bring its best adapter along (the restored
    best-score state refers to it)."""
    src = Path(ckpt_path).parent / best_path.name
    if _rank0() and src.is_file() and src.resolve() != best_path.resolve() and not best_path.is_file():
        best_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, best_path)


KEEP_IN_PLACE = (".hydra", "train.log", "previous", ".refused")


def archive_run(run_dir: Path) -> Path:
    """Move a finished (or failed) run's files (results, checkpoints, predictions, plots, logs) into
    ``previous/<time>/`` so that re-running it in the same directory (``skip_complete=false``) loses nothing."""
    run_dir = Path(run_dir)
    if not _rank0():
        return run_dir / "previous"
    dest = run_dir / "previous" / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}"
    dest.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if entry.name not in KEEP_IN_PLACE:
            entry.replace(dest / entry.name)
    started = run_dir / ".hydra" / "started"
    if started.is_dir():
        started.replace(dest / "hydra_started")
    log.info("skip_complete=false: the previous run's files are kept in %s", dest)
    return dest


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, UqloraError) else f"{type(exc).__name__}: {text}"


def record_failure(run_dir: Path, cfg: DictConfig, exc: BaseException, label: str | None = None) -> None:
    """``results.json`` with ``status: failed`` and the error (``error.log``: the traceback). Never replaces
    a complete result; never raises (the original error is what matters)."""
    try:
        if is_complete(read_results(run_dir)):
            return
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        atomic_write(Path(run_dir) / "error.log", lambda f: f.write(tb.encode()))
        try:
            config = resolved(cfg)
        except Exception:  # an unresolvable config is itself the error
            config = OmegaConf.to_container(cfg, resolve=False)
        atomic_json({"status": "failed", "error": one_line(exc), "error_type": type(exc).__name__,
                     "method": cfg.method.get("name"), "method_label": label or cfg.method.get("name"), "model": cfg.model.get("name"), "data": cfg.data.get("name"),
                     "seed": cfg.get("seed"), "run_dir": str(run_dir), "config": config}, Path(run_dir) / "results.json")
    except Exception as e:  # pragma: no cover - reporting must not mask the failure
        log.warning("could not record the failure in %s: %s", run_dir, e)
