"""Experiment loggers: W&B (offline unless the user is logged in; never asks for an account),
CSV, or none. Helpers that log images and tables do nothing for loggers that cannot show them."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

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


def build_logger(cfg, run_dir: Path):
    kind = cfg.logger.get("kind", "none")
    if kind not in LOGGERS:
        raise UqloraError(f"unknown logger '{kind}'; valid choices: {', '.join(LOGGERS)}")
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(cfg.logger.get("mode", "auto"))
    os.environ.setdefault("WANDB_SILENT", "true")
    tags = [f"method:{cfg.method.name}", f"data:{cfg.data.name}", f"model:{cfg.model.name}", f"seed:{cfg.seed}"]
    tags += list(cfg.logger.get("tags") or [])
    config = OmegaConf.to_container(cfg, resolve=True)
    return WandbLogger(project=cfg.logger.get("project", "uqlora"), entity=cfg.logger.get("entity"),
                       group=cfg.logger.get("group") or f"{cfg.data.name}-{cfg.model.name}",
                       name=run_dir.name, save_dir=str(run_dir), mode=mode, tags=tags, config=config,
                       job_type=cfg.logger.get("job_type", "train"))


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


def log_table(logger, key: str, columns: list[str], rows: list[list]) -> None:
    run = _wandb_run(logger)
    if run is not None:
        import wandb

        run.log({key: wandb.Table(columns=columns, data=rows)})


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
