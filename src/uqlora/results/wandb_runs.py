"""Runs of a W&B project as :class:`uqlora.results.collect.Run`: metrics from each run's summary
``<split>/<metric>``, the method label from the logged Hydra options (``hydra_choices``)."""
from __future__ import annotations

import os

from uqlora.results.collect import COMPLETE, FAILED, MISSING, UNREADABLE, Run, TablesError, run_from_results
from uqlora.rundir import label_of

SPLITS = ("train", "val", "calib", "test")


def load_wandb(path: str, group: str | None = None) -> list[Run]:
    """Runs of a W&B project ``entity/project`` (optionally one group): finished -> complete, failed/crashed
    -> failed, running -> missing. Needs network access and a W&B login; W&B runs carry no predictions, so
    figures other than the bar charts need run directories."""
    if path.count("/") != 1 or not all(path.split("/")):
        raise TablesError(f"--wandb '{path}' is not <entity>/<project>")
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        raise TablesError(f"--wandb {path} needs the W&B API, but WANDB_MODE={mode}; unset it and log in "
                          "(wandb login), or pass run directories instead")
    try:
        import wandb

        api = wandb.Api(timeout=30)
        wruns = list(api.runs(path, filters={"group": group} if group else {}))
    except Exception as e:  # no login, no network, unknown project: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TablesError(f"--wandb {path}: cannot read runs from W&B ({type(e).__name__}: {first}); log in with "
                          "`wandb login` and check the entity/project, or pass run directories instead") from None
    if not wruns:
        raise TablesError(f"--wandb {path}: no runs" + (f" in group '{group}'" if group else ""))
    return [_run(path, r) for r in wruns]


def _run(path: str, r) -> Run:
    cfg = dict(r.config or {})
    metrics: dict[str, dict] = {}
    for k, v in dict(r.summary or {}).items():
        if isinstance(v, (int, float)) and "/" in k:
            split, name = k.split("/", 1)
            if split in SPLITS and "/" not in name:
                metrics.setdefault(split, {})[name] = float(v)
    state = getattr(r, "state", "finished")
    status, error = {"finished": (COMPLETE, ""), "running": (MISSING, "W&B run still running")}.get(
        state, (FAILED, f"W&B run state '{state}'"))
    if status == COMPLETE and not metrics:
        status, error = UNREADABLE, "W&B summary has no <split>/<metric> values"
    mcfg = cfg.get("method") or {}
    label = label_of(mcfg.get("name"), mcfg, (cfg.get("hydra_choices") or {}).get("method"))
    return run_from_results({"metrics": metrics, "config": cfg, "wandb": f"{path}/{r.id}"}, None, status,
                            error + f" [wandb {path}/{r.id}]" if error else "", label=label)
