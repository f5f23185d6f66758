"""Experiment loggers: W&B (offline unless the user is logged in; never asks for an account),
CSV, or none. Helpers that log images and tables do nothing for loggers that cannot show them.

W&B runs are grouped by experiment (``logger.group``, else the experiment's ``experiment_name`` or the
``experiment=`` option, else ``<data>-<model>``) and tagged ``method:``, ``data:``, ``model:``, ``seed:``
(+ ``experiment:``, and ``option:<method option>`` when the option is not the method's name, e.g.
``laplace_ll``), so the W&B UI filters and groups a sweep the way the paper's tables do. Tables whose columns
are a curve (risk-coverage ``coverage``/``risk``, reliability ``confidence``/``accuracy``) are also logged as
native W&B line plots (``wandb.plot.line``) next to the table."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Mapping

from omegaconf import OmegaConf

from uqlora.errors import UqloraError

log = logging.getLogger(__name__)
LOGGERS = ("wandb", "csv", "none")


def wandb_mode(requested: str | None = "auto") -> str:
    """``WANDB_MODE`` wins; ``auto`` is online only when an API key is available, else offline."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if requested and requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc()
        if rc.authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def experiment_name(cfg, choices: Mapping[str, str] | None = None) -> str | None:
    """The experiment a run belongs to: ``experiment_name`` (set by every conf/experiment file), else the
    ``experiment=`` option of the Hydra job (``choices``: its config-group options); None for a plain run."""
    name = cfg.get("experiment_name") if hasattr(cfg, "get") else None
    return str(name) if name else (choices or {}).get("experiment")


def run_tags(cfg, choices: Mapping[str, str] | None = None) -> list[str]:
    """W&B tags: method, data, model, seed (+ experiment, + the method option when it is not the name)."""
    choices = choices or {}
    tags = [f"method:{cfg.method.name}", f"data:{cfg.data.name}", f"model:{cfg.model.name}", f"seed:{cfg.seed}"]
    exp = experiment_name(cfg, choices)
    if exp:
        tags.append(f"experiment:{exp}")
    option = choices.get("method")
    if option and option != cfg.method.name:
        tags.append(f"option:{option}")
    return tags + [str(t) for t in (cfg.logger.get("tags") or [])]


def build_logger(cfg, run_dir: Path, choices: Mapping[str, str] | None = None):
    """The logger of ``cfg.logger`` writing into ``run_dir``; ``choices``: the Hydra job's config-group options
    (W&B tags, group and the ``hydra_choices`` config entry)."""
    kind = cfg.logger.get("kind", "none")
    if kind not in LOGGERS:
        raise UqloraError(f"unknown logger '{kind}'; valid choices: {', '.join(LOGGERS)}")
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    from lightning.pytorch.loggers import WandbLogger

    finish()  # a run still open in this process (an earlier train() in a notebook) would take this run's logs
    mode = wandb_mode(cfg.logger.get("mode", "auto"))
    os.environ.setdefault("WANDB_SILENT", "true")
    choices = dict(choices or {})
    tags = run_tags(cfg, choices)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if choices:
        config["hydra_choices"] = choices  # e.g. method: laplace_ll -- experiments/make_tables.py --wandb reads it
    group = cfg.logger.get("group") or experiment_name(cfg, choices) or f"{cfg.data.name}-{cfg.model.name}"
    return WandbLogger(project=cfg.logger.get("project", "uqlora"), entity=cfg.logger.get("entity"),
                       group=group, name=run_dir.name, save_dir=str(run_dir), mode=mode, tags=tags, config=config,
                       job_type=cfg.logger.get("job_type", "train"), id=wandb_run_id(run_dir), resume="allow")


def wandb_run_id(run_dir: Path) -> str:
    """One W&B run id per run directory (``wandb_run_id``): a resumed run (``resume=true``) logs into the same
    W&B run instead of starting another."""
    import uuid

    from uqlora.io import atomic_write

    path = Path(run_dir) / "wandb_run_id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write(path, lambda f: f.write(run_id.encode()))
    return run_id


def _wandb_run(logger):
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return None
    return logger.experiment if isinstance(logger, WandbLogger) else None


def log_image(logger, key: str, path: Path) -> None:
    run = _wandb_run(logger)
    if run is not None:
        import wandb

        run.log({key: wandb.Image(str(path))})


#: column names that make a table a curve W&B can draw natively: ((x, y, stroke or None), title)
CURVES = (
    (("coverage", "risk", "score"), "risk-coverage"),
    (("coverage", "risk", "method"), "risk-coverage"),
    (("coverage", "risk", None), "risk-coverage"),
    (("confidence", "accuracy", None), "reliability (bin accuracy vs confidence)"),
)


def curve_spec(columns: list[str]) -> tuple[str, str, str | None, str] | None:
    """(x, y, stroke, title) of the line plot a table's columns describe, or None."""
    cols = set(columns)
    for (x, y, stroke), title in CURVES:
        if x in cols and y in cols and (stroke is None or stroke in cols):
            return x, y, stroke, title
    return None


def log_table(logger, key: str, columns: list[str], rows: list[list], plot: bool = True) -> None:
    """Log ``rows`` as a ``wandb.Table`` under ``key``; when the columns are a curve (see :data:`CURVES`) and
    ``plot``, also a native line plot under ``<key>_plot`` (one line per ``stroke`` value, e.g. per score)."""
    run = _wandb_run(logger)
    if run is not None:
        import wandb

        table = wandb.Table(columns=columns, data=rows)
        payload = {key: table}
        spec = curve_spec(columns) if plot else None
        if spec is not None:
            x, y, stroke, title = spec
            if stroke is None and "count" in columns:  # reliability: drop empty bins (their accuracy is NaN)
                idx = columns.index("count")
                table = wandb.Table(columns=columns, data=[r for r in rows if r[idx]])
            payload[f"{key}_plot"] = wandb.plot.line(table, x, y, stroke=stroke, title=f"{key}: {title}")
        run.log(payload)


def log_results_table(logger, results: dict, key: str = "results") -> None:
    """One row per evaluated split with the run's identity and its scalar metrics (a ``wandb.Table`` that
    W&B can join across the runs of a group into the paper's table)."""
    metrics = results.get("metrics") or {}
    names = sorted({k for m in metrics.values() for k, v in m.items() if isinstance(v, (int, float))})
    columns = ["method", "model", "data", "seed", "split"] + names
    rows = [[results.get("method"), results.get("model"), results.get("data"), results.get("seed"), split]
            + [m.get(k) for k in names] for split, m in metrics.items()]
    log_table(logger, key, columns, rows, plot=False)


def log_summary(logger, metrics: dict) -> None:
    run = _wandb_run(logger)
    if run is not None:
        for k, v in metrics.items():
            run.summary[k] = v
    elif logger:
        logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def finish() -> None:
    """Close the W&B run if one is open (called also after an exception)."""
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    if wandb.run is not None:
        wandb.finish()
