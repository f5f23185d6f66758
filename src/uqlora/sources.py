"""Finished runs as inputs of a new run: the adapter a post-hoc method starts from (``method.map_run``, or a
PEFT-format adapter trained elsewhere: ``method.adapter``; ``train.init_adapter`` for one to train further),
the method it wraps (temperature scaling of any run), and the predictive of a teacher run (UAL).

Methods never open run directories themselves: the orchestrator attaches the source here, and hands methods
that need other runs' predictions a :class:`RunAccess`.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from uqlora.build import Task, build_member, build_trainer, init_seed
from uqlora.data.datamodule import task_info
from uqlora.errors import UqloraError
from uqlora.methods import get_method
from uqlora.models.backbone import resolve_head
from uqlora.predict import pool, predict
from uqlora.rundir import RunDir, is_complete
from uqlora.runs import PRESENTATION, config_diff

log = logging.getLogger(__name__)
MAP_LIKE = ("map", "temperature")  # source runs whose predictive is the softmax of the adapter's logits
SAME_SPLITS = ("name", "max_train_samples", "val_size", "calib_size")


def check_source(cfg: DictConfig, src: RunDir, what: str = "method.map_run") -> DictConfig:
    """The source run's config, checked to have the same model (incl. LoRA and head) and the same data splits."""
    scfg = src.config()
    theirs, ours = (OmegaConf.to_container(c.model, resolve=True) for c in (scfg, cfg))
    newer = sorted(set(ours) - set(theirs))  # keys added to the model configs after the source run was made
    if newer:
        log.info("%s predates model keys %s; comparing the others", what, ", ".join(newer))
    diff = sorted(k for k in set(theirs) | set(ours) if k not in newer and theirs.get(k) != ours.get(k))
    if diff:
        raise UqloraError(f"{what} '{src.path}' used another model config (differs in {', '.join(diff)})")
    for key in SAME_SPLITS:
        if scfg.data.get(key) != cfg.data.get(key):
            raise UqloraError(f"{what} '{src.path}' used data.{key}={scfg.data.get(key)}, this run "
                              f"{cfg.data.get(key)}: the train/val splits would differ")
    if int(scfg.seed) != int(cfg.seed):
        raise UqloraError(f"{what} '{src.path}' used seed={scfg.seed} (data splits), this run seed={cfg.seed}")
    return scfg


def _cell_runs(cfg: DictConfig, run_dir: str | Path, method: str) -> list[tuple[Path, dict]]:
    """``(run directory, its config)`` of the finished runs of method ``method`` in ``run_dir``'s sweep folder (its
    parent) with this run's model, dataset, data splits and seed."""
    here = Path(run_dir).resolve()
    found = []
    for d in sorted(p for p in here.parent.iterdir() if p.is_dir() and p.resolve() != here):
        res = RunDir(d).results()
        scfg = (res or {}).get("config") or {}
        if not is_complete(res) or res.get("method") != method or int(scfg.get("seed", -1)) != int(cfg.seed):
            continue
        if (scfg.get("model") or {}).get("name") != cfg.model.name:
            continue
        if all((scfg.get("data") or {}).get(k) == cfg.data.get(k) for k in SAME_SPLITS):
            found.append((d.resolve(), scfg))
    return found


def _reuse(cfg: DictConfig) -> bool:
    return bool((cfg.get("train") or {}).get("reuse_map"))


def sweep_map_run(cfg: DictConfig, run_dir: str | Path) -> str | None:
    """``train.reuse_map=true``: a method that can start from a finished run (its config has ``map_run``, left
    unset) takes the MAP run of the same cell -- same model, dataset, data splits and seed -- from its own
    sweep folder (the run directory's parent) instead of training that MAP model again. Sets
    ``cfg.method.map_run`` and returns it; None when it does not apply. A sweep lists ``method=map`` before
    the post-hoc methods (Hydra runs a sweep's jobs in order), so the MAP run is finished when they start."""
    if not _reuse(cfg) or "map_run" not in cfg.method or cfg.method.get("map_run"):
        return None
    sweep = Path(run_dir).resolve().parent
    found = [d for d, _ in _cell_runs(cfg, run_dir, "map")]
    cell = f"model={cfg.model.name} data={cfg.data.name} seed={cfg.seed}"
    if not found:
        raise UqloraError(f"train.reuse_map=true: no finished MAP run of {cell} in {sweep}; valid: a sweep "
                          f"that lists method=map before method={cfg.method.name}, method.map_run=<run dir>, or "
                          "train.reuse_map=false (train its own MAP)")
    if len(found) > 1:
        raise UqloraError(f"train.reuse_map=true: {len(found)} finished MAP runs of {cell} in {sweep} "
                          f"({', '.join(d.name for d in found)}); valid: method.map_run=<one of them>")
    with open_dict(cfg):
        cfg.method.map_run = str(found[0])
    log.info("train.reuse_map: %s starts from the sweep's MAP run %s", cfg.method.name, found[0])
    return cfg.method.map_run


# an M-member method -> the single-model method whose run is its member 0 (same seed, hence the same LoRA
# initialisation and data order, and the same training)
FIRST_MEMBER_OF = {"ensemble": "map", "multiswag": "swag"}
_MEMBER_KEYS = ("name", "display_name", "num_models")
# ... and back: separate runs of the single-model method pooled by ``eval.py ensemble=[...]`` are that M-member method
POOLED_AS = {single: multi for multi, single in FIRST_MEMBER_OF.items()}


def pooled_method(cfg: DictConfig, label: str, num_models: int) -> tuple[DictConfig, str]:
    """The config and table label that runs pooled by ``eval.py ensemble=[...]`` are recorded under: MAP runs
    pooled are an ensemble, SWAG runs MultiSWAG (``swag_lora`` runs ``multiswag_lora``); any other method keeps
    its name with ``_pooled`` added to its label. The members' own label would put the pool in the tables as
    one more run of the members' cell."""
    from uqlora.methods import SCHEMAS, discover

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    base = str(out.method.name)
    multi = POOLED_AS.get(base)
    if multi is None:
        out.method.display_name = f"{out.method.get('display_name') or base} (pooled runs)"
        return out, f"{label}_pooled"
    discover()
    out.method.name = multi
    out.method.display_name = SCHEMAS[multi].display_name
    out.method.num_models = int(num_models)
    return out, (label.replace(base, multi, 1) if label.startswith(base) else multi)


def sweep_first_member(cfg: DictConfig, run_dir: str | Path) -> RunDir | None:
    """``train.reuse_map=true`` for an ensemble / MultiSWAG: member 0 is the sweep's finished MAP / SWAG run of the
    same cell when that run's config is this one's but for the method's name and size -- its adapter (and
    SWAG moments) are loaded instead of training it again. None (member 0 is trained) otherwise."""
    single = FIRST_MEMBER_OF.get(str(cfg.method.name))
    if not _reuse(cfg) or single is None:
        return None
    ours = OmegaConf.to_container(cfg, resolve=True)
    same = []
    for d, theirs in _cell_runs(cfg, run_dir, single):
        a, b = ({k: v for k, v in (c.get("method") or {}).items() if k not in _MEMBER_KEYS} for c in (theirs, ours))
        diff = config_diff({**theirs, "method": a}, {**ours, "method": b}, PRESENTATION)
        if diff:
            log.info("train.reuse_map: %s is not member 0 of this %s (differs in %s)", d, cfg.method.name, diff[0])
        else:
            same.append(d)
    if len(same) > 1:
        raise UqloraError(f"train.reuse_map=true: {len(same)} finished {single} runs could be member 0 of this "
                          f"{cfg.method.name} ({', '.join(d.name for d in same)}); valid: one per cell in a sweep folder")
    if not same:
        return None
    log.info("train.reuse_map: member 0 of this %s is the sweep's %s run %s", cfg.method.name, single, same[0])
    return RunDir(same[0])


def attach_source(cfg: DictConfig, method, member: int = 0) -> str:
    """Load member ``member`` of ``method.map_run`` into ``method`` instead of training it: its adapter, and
    for a method that wraps any predictive (temperature scaling) the source's own method with its state."""
    src = RunDir(str(cfg.method.map_run))
    scfg = check_source(cfg, src)
    dirs = src.members()
    wraps_any = bool(getattr(method, "wraps_any", False))
    if wraps_any and len(dirs) > 1:
        raise UqloraError(f"method.map_run '{src.path}' has {len(dirs)} members ({scfg.method.name}); "
                          f"{cfg.method.name} of a multi-member run is not supported: pass a single-model run directory")
    if member >= len(dirs):
        raise UqloraError(f"method.map_run '{src.path}' has {len(dirs)} member(s); member {member} was requested")
    if wraps_any and scfg.method.name == cfg.method.name and scfg.method.get("map_run"):
        raise UqloraError(f"method.map_run '{src.path}' is itself {cfg.method.name} of '{scfg.method.map_run}'; "
                          "pass that run directory instead")
    method.backbone.load_trainable_state_dict(dirs[member].adapter())
    if wraps_any and scfg.method.name not in MAP_LIKE:
        base = build_base(cfg, scfg.method, method.backbone)
        base.load_method_state_dict(dirs[member].method_state())
        method.attach_base(base)
    log.info("using the adapter of %s (no training)", dirs[member].path)
    return str(dirs[member].path)


ADAPTER_KEYS = ("method.adapter", "train.init_adapter")


def adapter_source(cfg: DictConfig) -> tuple[str, str] | None:
    """``(config key, folder or hub id)`` of the PEFT adapter the run starts from, or None."""
    for key in ADAPTER_KEYS:
        group, _, name = key.partition(".")
        value = (cfg.get(group) or {}).get(name)
        if value:
            return key, str(value)
    return None


def check_adapter_source(cfg: DictConfig) -> None:
    """Read the run's PEFT adapter and check it against ``model=...`` before any data or model loads."""
    from uqlora.models.peft_io import check_adapter, read_adapter

    found = adapter_source(cfg)
    if found is not None:
        check_adapter(read_adapter(found[1], found[0]), cfg.model, found[0])


def attach_adapter(cfg: DictConfig, method, key: str) -> dict:
    """Load the PEFT adapter of config key ``key`` (:data:`ADAPTER_KEYS`) into ``method``'s backbone; returns
    what ``results.json`` records: the source as given, the folder read (a hub id: its cached snapshot) and
    the SHA-256 of its weights file."""
    from uqlora.models.peft_io import load_adapter

    group, _, name = key.partition(".")
    adapter = load_adapter(method.backbone, str(cfg[group][name]), cfg.model, key)
    return {name: adapter.source, f"{name}_folder": str(adapter.path), f"{name}_sha256": adapter.sha256}


def export_member(cfg: DictConfig, method, member_dir: RunDir, folder: str | Path | None = None,
                  strict: bool = False) -> Path | None:
    """Write ``method``'s adapter in PEFT format into ``member_dir``'s ``adapter/`` (or ``folder``); an adapter
    with no PEFT form is skipped with a warning (``strict``: raised)."""
    from uqlora.models.peft_export import export_adapter

    try:
        files = export_adapter(method.backbone, cfg.model).files()
    except UqloraError as e:
        if strict:
            raise
        log.warning("no PEFT-format adapter/ written for %s: %s", member_dir.path, e)
        return None
    return member_dir.save_peft_adapter(files, folder)


def build_base(cfg: DictConfig, method_cfg, backbone):
    """The method of a wrapped source run (config ``method_cfg``) on ``backbone``, with this run's other settings
    (the model and data splits are the same: :func:`check_source`)."""
    merged = cfg.copy()
    with open_dict(merged):
        merged.method = OmegaConf.create(OmegaConf.to_container(method_cfg, resolve=True, enum_to_str=True)
                                         if isinstance(method_cfg, DictConfig) else dict(method_cfg))
    return get_method(str(merged.method.name))(backbone, merged)


def restore_member(cfg: DictConfig, method, mdir: RunDir) -> None:
    """Put a saved member (adapter + method state) into ``method``; a wrapped base method saved inside the state
    (``base_method_config``) is rebuilt first, so the run directory alone restores it."""
    state = mdir.method_state()
    base_cfg = state.get("base_method_config") if isinstance(state, dict) else None
    if base_cfg and getattr(method, "wraps_any", False):
        method.attach_base(build_base(cfg, base_cfg, method.backbone))
    method.backbone.load_trainable_state_dict(mdir.adapter())
    method.load_method_state_dict(state)


class RunAccess:
    """What a method may ask of other finished runs (e.g. UAL's teacher): their pooled predictive on given
    records of this run's dataset, and a fingerprint of their saved state (for caches)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def fingerprint(self, run_dir: str | Path) -> list[dict]:
        def digest(path: Path) -> str:
            return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "-"

        return [{"adapter": digest(d.checkpoints / "adapter.pt"), "method_state": digest(d.checkpoints / "method_state.pt")}
                for d in RunDir(Path(run_dir).resolve()).members()]

    def predictions(self, run_dir: str | Path, records: list[dict]) -> dict[str, np.ndarray]:
        """The predictive of a finished run (all of its members pooled) on ``records`` -- e.g. a teacher's on this
        run's training examples. The run may use another model (its own tokenizer and head); it must have the
        same task and number of classes."""
        cfg, src = self.cfg, RunDir(run_dir)
        scfg = src.config()
        info, sinfo = task_info(cfg.data), task_info(scfg.data)
        if (sinfo.task, sinfo.num_classes) != (info.task, info.num_classes):
            raise UqloraError(f"run '{src.path}' was trained for {sinfo.task} with {sinfo.num_classes} classes "
                              f"({scfg.data.name}); this data ({cfg.data.name}) is {info.task} with {info.num_classes}")
        scfg.data = cfg.data
        for key in ("progress_bar", "trainer"):
            if cfg.get(key) is not None:
                scfg[key] = cfg[key]
        task = Task(info, resolve_head(scfg.model, info.task), {"given": list(records)})
        method, dm = build_member(scfg, task, init_seed(scfg))
        preds = []
        with tempfile.TemporaryDirectory() as work:
            trainer = build_trainer(scfg, Path(work), False, [])
            for mdir in src.members():
                restore_member(scfg, method, mdir)
                preds.append(predict(trainer, method, dm, "given"))
        return pool(preds)
