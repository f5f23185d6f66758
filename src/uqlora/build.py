"""Build the objects of a run from its config: the data (task info, carved splits), one member (backbone =
pretrained model + LoRA + head, its method module, its datamodule) and the Lightning trainer."""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from uqlora.context import RunContext
from uqlora.data.datamodule import TaskInfo, UQDataModule, build_splits, task_info
from uqlora.data.prompts import answer_words
from uqlora.errors import UqloraError
from uqlora.methods import get_method
from uqlora.models.backbone import build_backbone, resolve_head
from uqlora.models.loading import load_pretrained
from uqlora.models.precision import effective_precision
from uqlora.models.sft import build_sft_backbone

log = logging.getLogger(__name__)


@dataclass
class Task:
    """What a run's data is: task info, the head that scores it, and the carved splits (records)."""

    info: TaskInfo
    head: str
    records: dict[str, list[dict]]


def load_task(cfg: DictConfig, records: dict | None = None) -> Task:
    """Task info, head and the carved splits; data first, so a missing folder fails before a model loads."""
    info = task_info(cfg.data)
    head = resolve_head(cfg.model, info.task)
    return Task(info, head, build_splits(cfg.data, int(cfg.seed)) if records is None else records)


def data_files(cfg: DictConfig) -> dict[str, str]:
    """SHA-256 of the local files of the data (and ood) dataset, checked against the data dir's SHA256SUMS
    (a modified or corrupted file fails in one line); recorded in ``results.json``."""
    from uqlora.data.datasets import verify_files

    out = verify_files(cfg.data.name, cfg.data.get("data_dir"))
    if cfg.data.get("ood"):
        out.update(verify_files(cfg.data.ood, cfg.data.get("data_dir")))
    return out


def init_seed(cfg) -> int:
    """Seed of the LoRA initialisation and the data order (the splits always follow ``cfg.seed``)."""
    init = cfg.get("train", {}).get("init_seed")
    return int(cfg.seed) if init is None else int(init)


def make_backbone(cfg: DictConfig, info: TaskInfo, head: str):
    """``(backbone, tokenizer)``: the pretrained model of ``cfg.model`` with fresh LoRA and the head scoring
    ``info``'s task (the answer words of ``cfg.data.prompt`` for ``lm_choices``)."""
    model, tok = load_pretrained(cfg.model)
    if head == "lm_sft":  # token-level SFT of generation data
        return build_sft_backbone(cfg.model, model), tok
    words = answer_words(cfg.data.get("prompt"), info.task, info.num_classes, info.label_names)
    return build_backbone(cfg.model, head, info.num_classes, answer_words=words, tokenizer=tok, model=model), tok


def build_member(cfg: DictConfig, task: Task, member_seed: int):
    """A fresh backbone (LoRA initialised with ``member_seed``), its method module and datamodule."""
    pl.seed_everything(member_seed, workers=True, verbose=False)
    if task.head == "lm_sft":  # token-level SFT of generation data
        check_generation_method(cfg, get_method(cfg.method.name))
    backbone, tok = make_backbone(cfg, task.info, task.head)
    method = get_method(cfg.method.name)(backbone, cfg)
    dm = UQDataModule(cfg.data, tok, task.head, causal=cfg.model.kind == "causal", seed=int(cfg.seed),
                      records=task.records, shuffle_seed=member_seed, cloze_impl=str(cfg.model.cloze_impl))
    return method, dm


def check_generation_method(cfg: DictConfig, method_cls) -> None:
    """Generation data trains one model whose predictive is a per-token vocabulary distribution: the methods
    that declare ``supports_generation`` (MAP, UAL, MC dropout, SWAG), one member."""
    if not getattr(method_cls, "supports_generation", False):
        from uqlora.methods import METHODS

        ok = sorted(n for n, c in METHODS.items() if getattr(c, "supports_generation", False))
        raise UqloraError(f"method={cfg.method.name} does not run on generation data ({cfg.data.name}); valid "
                          f"choices: {', '.join(ok)}")
    if int(cfg.method.get("num_models", 1)) > 1:
        raise UqloraError(f"method.num_models={cfg.method.num_models}: pooling members is not supported on generation "
                          f"data ({cfg.data.name}); train one model per run")


def setup(cfg: DictConfig):
    """Backbone (model + LoRA + head), method module and datamodule for a config (one member)."""
    return build_member(cfg, load_task(cfg), int(cfg.seed))


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks, n_train_batches: int = 0,
                  ctx: RunContext | None = None) -> pl.Trainer:
    """The Lightning trainer of ``cfg.trainer``. Prediction runs under ``no_grad``, not ``inference_mode``, so a
    predictive that needs gradients (Laplace's GLM Jacobians, under ``torch.enable_grad``) works for every
    method and every wrapper of it."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

    from uqlora.callbacks.progress import LineProgress
    from uqlora.progress import resolve_progress_bar

    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t["precision"] = effective_precision(t.get("precision", "32-true"), t.get("accelerator", "cpu"))
    t["strategy"] = make_strategy(t.get("strategy", "auto"))
    cbs = list(callbacks)
    progress = resolve_progress_bar(cfg.get("progress_bar", "auto"))
    if progress == "rich":
        cbs.append(RichProgressBar(leave=True))
    elif progress == "text":
        cbs.append(LineProgress())
    if logger:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    has_ckpt = any(isinstance(c, ModelCheckpoint) for c in cbs)

    def make(**over):
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            return pl.Trainer(logger=logger, callbacks=cbs, default_root_dir=str(run_dir), enable_checkpointing=has_ckpt,
                              enable_progress_bar=progress == "rich",
                              inference_mode=False, **{**t, **over})
        except MisconfigurationException as e:  # e.g. trainer=fsdp / accelerator=gpu without a GPU
            strat = cfg.trainer.get("strategy", "auto")
            strat = str(strat.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(strat, DictConfig) else strat
            raise UqloraError(f"trainer (accelerator={t.get('accelerator')}, devices={t.get('devices')}, "
                              f"strategy={strat}): {e}") from e

    trainer = make()
    world = num_processes(trainer)
    vci = t.get("val_check_interval")
    per_rank = -(-n_train_batches // world)  # each process sees 1/W of the train batches (DDP)
    if n_train_batches and isinstance(vci, int) and vci > per_rank:
        log.info("trainer.val_check_interval=%d > %d batches per epoch%s: validating at each epoch end", vci, per_rank,
                 f" and process ({world} processes)" if world > 1 else "")
        trainer = make(val_check_interval=1.0)
    if world > 1:
        start_processes(trainer, ctx or RunContext(Path(run_dir)))
    return trainer


def num_processes(trainer: pl.Trainer) -> int:
    """How many processes the trainer's strategy runs (devices x nodes), known before its processes start."""
    s = trainer.strategy
    return max(int(trainer.world_size), int(getattr(s, "num_processes", 1) or 1) * int(getattr(s, "num_nodes", 1) or 1))


def make_strategy(spec):
    """``trainer.strategy``: a Lightning strategy name (``auto``, ``ddp``, ...) or a config with ``_target_``
    (e.g. ``lightning.pytorch.strategies.DDPStrategy``, ``FSDPStrategy``) instantiated with its arguments;
    ``auto_wrap_policy`` / ``activation_checkpointing_policy`` given as a list of dotted class names (the
    transformer block classes) become the set of classes Lightning expects."""
    if not isinstance(spec, dict):
        return spec
    from hydra.utils import instantiate

    spec = dict(spec)
    for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
        names = spec.get(key)
        if isinstance(names, (list, tuple)):
            classes, missing = set(), []
            for name in names:
                mod, _, cls = str(name).rpartition(".")
                try:
                    classes.add(getattr(importlib.import_module(mod), cls))
                except (ImportError, AttributeError, ValueError):
                    missing.append(str(name))
            if missing:
                log.info("trainer.strategy.%s: skipping classes not importable here: %s", key, ", ".join(missing))
            if not classes:
                raise UqloraError(f"trainer.strategy.{key}: none of {list(names)} can be imported")
            spec[key] = classes
    return instantiate(spec, _convert_="all")


def start_processes(trainer: pl.Trainer, ctx: RunContext) -> None:
    """Start the other processes of a multi-process strategy (DDP) now and bring up the process group, instead
    of at the first ``fit``/``predict``: every stage outside the Trainer -- post-hoc fits (KFAC factors summed
    across processes), runs without training (``method.map_run``) -- then runs in every process with the
    collectives available. Lightning re-launches the script for ranks > 0 (with ``hydra.run.dir`` set to this
    run's directory); srun / torchrun start them themselves. Idempotent: later fits reuse the process group."""
    import torch.distributed

    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    env = getattr(strategy, "cluster_environment", None)
    up = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not up and launcher is not None and env is not None and not env.creates_processes_externally:
        if not ctx.hydra_job:
            raise UqloraError(f"a {trainer.world_size}-process strategy re-runs the script once per process: start it "
                              "with `python train.py ...` (or eval.py), or let srun/torchrun start the processes")
        if ctx.multirun:
            raise UqloraError("Lightning cannot re-launch the processes of a multi-process strategy from a local "
                              "multirun (-m): run each point on its own, or use hydra/launcher=slurm with "
                              "hydra.launcher.tasks_per_node=<devices> (srun starts one process per device)")
        launcher.launch(lambda: None, trainer=trainer)
    strategy.setup_environment()  # ranks, device, process group (joined once, reused by every later trainer)
