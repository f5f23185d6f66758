"""The task functions behind ``train.py`` and ``eval.py``.

``train(cfg)``: load data and backbone -> fit (methods that train) -> restore the best adapter ->
post-hoc fit on the calib split -> predict every evaluation split -> metrics -> run directory:

    .hydra/config.yaml        the composed config (written by Hydra)
    results.json              status (complete | failed + error), metrics per split, timings, versions,
                              git commit + dirty flag, data file hashes, seed, the resolved config
    run_config.json           the resolved config the run started with (resume checks against it)
    error.log                 the traceback of a failed run
    predictions/<split>.npz   probs, labels, ids (and samples for sampling methods)
    plots/reliability_<split>.png
    checkpoints/adapter.pt    LoRA + head tensors used for the reported numbers
    checkpoints/method_state.pt   the method's fitted post-hoc state (may be empty)
    checkpoints/last.ckpt     adapter + optimiser + loop/callback/RNG state, for resume=true

Both are plain functions returning ``(metrics, objects)`` so tests and notebooks can call them.
"""
from __future__ import annotations

import logging
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
from uqlora.callbacks.rng import RNGStateCheckpoint
from uqlora.data.datamodule import UQDataModule, build_splits, task_info
from uqlora.data.prompts import answer_words
from uqlora.errors import UqloraError
from uqlora.io import atomic_json, atomic_npz, atomic_torch_save
from uqlora.runs import archive_run, carry_best_adapter as _carry_best_adapter
from uqlora.runs import check_same_config, read_results, record_failure, restore_hydra_files, resume_points
from uqlora.validate import validate_config
from uqlora.logging_utils import build_logger, log_image, log_results_table, log_summary, log_table
from uqlora.methods import get_method
from uqlora.metrics import evaluate_ood, evaluate_predictions, reliability_bins, reliability_diagram
from uqlora.models.backbone import build_backbone, resolve_head
from uqlora.models.loading import load_pretrained

log = logging.getLogger(__name__)
TABLE_KEYS = ("acc", "ece", "nll", "brier")
PROBABILITY_SCORES = ("adue", "sr")  # per-example uncertainties meant as a probability of error (ECE reported)


def load_task(cfg: DictConfig):
    """Task info, head and the carved splits; data first, so a missing folder fails before a model loads."""
    info = task_info(cfg.data)
    head = resolve_head(cfg.model, info.task)
    return info, head, build_splits(cfg.data, int(cfg.seed))


def data_files(cfg: DictConfig) -> dict[str, str]:
    """SHA-256 of the local files of the data (and ood) dataset, checked against the data dir's SHA256SUMS
    (a modified or corrupted file fails in one line); recorded in ``results.json``."""
    from uqlora.data.datasets import verify_files

    out = verify_files(cfg.data.name, cfg.data.get("data_dir"))
    if cfg.data.get("ood"):
        out.update(verify_files(cfg.data.ood, cfg.data.get("data_dir")))
    return out


def build_member(cfg: DictConfig, info, head: str, records: dict, member_seed: int):
    """A fresh backbone (LoRA initialised with ``member_seed``), its method module and datamodule."""
    pl.seed_everything(member_seed, workers=True, verbose=False)
    model, tok = load_pretrained(cfg.model)
    words = answer_words(cfg.data.get("prompt"), info.task, info.num_classes, info.label_names)
    backbone = build_backbone(cfg.model, head, info.num_classes, answer_words=words, tokenizer=tok, model=model)
    method = get_method(cfg.method.name)(backbone, cfg)
    dm = UQDataModule(cfg.data, tok, head, causal=cfg.model.kind == "causal", seed=int(cfg.seed), records=records,
                      shuffle_seed=member_seed)
    return method, dm


def setup(cfg: DictConfig):
    """Backbone (model + LoRA + head), method module and datamodule for a config (one member)."""
    info, head, records = load_task(cfg)
    return build_member(cfg, info, head, records, int(cfg.seed))


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks, n_train_batches: int = 0,
                  inference_mode: bool = True) -> pl.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t["strategy"] = make_strategy(t.get("strategy", "auto"))
    cbs = list(callbacks)
    if cfg.get("progress_bar", "rich") == "rich":
        cbs.append(RichProgressBar(leave=True))
    if logger:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    has_ckpt = any(isinstance(c, ModelCheckpoint) for c in cbs)

    def make(**over):
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:  # methods whose predictive needs gradients (Laplace's GLM Jacobians) predict under no_grad
            return pl.Trainer(logger=logger, callbacks=cbs, default_root_dir=str(run_dir), enable_checkpointing=has_ckpt,
                              enable_progress_bar=cfg.get("progress_bar", "rich") != "none",
                              inference_mode=inference_mode, **{**t, **over})
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
        start_processes(trainer)
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
    import importlib

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


def start_processes(trainer: pl.Trainer) -> None:
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
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            raise UqloraError(f"a {trainer.world_size}-process strategy re-runs the script once per process: start it "
                              "with `python train.py ...` (or eval.py), or let srun/torchrun start the processes")
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise UqloraError("Lightning cannot re-launch the processes of a multi-process strategy from a local "
                              "multirun (-m): run each point on its own, or use hydra/launcher=slurm with "
                              "hydra.launcher.tasks_per_node=<devices> (srun starts one process per device)")
        launcher.launch(lambda: None, trainer=trainer)
    strategy.setup_environment()  # ranks, device, process group (joined once, reused by every later trainer)


def predict(trainer: pl.Trainer, method, dm: UQDataModule, split: str) -> dict[str, np.ndarray]:
    """The predictive on every example of ``split``, in data order. With W > 1 processes each predicts a
    contiguous, unpadded shard and the shards are gathered in rank order: every example exactly once, and every
    rank returns the whole split."""
    from uqlora.distributed import all_gather_object, global_rank, shard_loader, world_size

    loader = dm.loader(split)
    world = world_size()  # the process group's: every process runs this same call
    if world > 1:
        loader = shard_loader(loader, world, global_rank())
    outs = trainer.predict(method, dataloaders=loader)
    res = _concat_outputs(outs)
    if world > 1:
        res = _concat_outputs([p for p in all_gather_object(res) if p])
    res["ids"] = np.array([str(r["id"]) for r in dm.records[split]])
    if len(res.get("labels", ())) != len(res["ids"]):
        raise UqloraError(f"predictions on '{split}' cover {len(res.get('labels', ()))} of {len(res['ids'])} examples")
    return res


def _concat_outputs(outs: list[dict]) -> dict[str, np.ndarray]:
    """Batch (or per-process) outputs -> one array per key; samples [S, N, C] are joined on the example axis."""
    if not outs:
        return {}
    cat = lambda xs, dim: (torch.cat(xs, dim=dim).cpu().numpy() if torch.is_tensor(xs[0])  # noqa: E731
                           else np.concatenate(xs, axis=dim))
    return {k: cat([o[k] for o in outs], 1 if k == "samples" else 0) for k in outs[0]}


def combine(members: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Ensemble M members' predictions: every member contributes its samples (or its probs as one sample);
    the predictive is the mean probability over all M x S draws."""
    if len(members) == 1:
        return members[0]
    for m in members[1:]:
        if not np.array_equal(m["labels"], members[0]["labels"]) or not np.array_equal(m["ids"], members[0]["ids"]):
            raise UqloraError("ensemble members were evaluated on different examples; they must share data and seed")
    samples = np.concatenate([m["samples"] if "samples" in m else m["probs"][None] for m in members], axis=0)
    out = {"probs": samples.mean(0), "labels": members[0]["labels"], "ids": members[0]["ids"], "samples": samples}
    if all("gen_scores" in m for m in members):  # free-text rounds: every member's rounds pooled
        out.update({k: members[0][k] for k in ("gen_greedy", "gen_index", "_gen_texts") if k in members[0]})  # greedy: member 0
        out["gen_scores"] = np.concatenate([m["gen_scores"] for m in members], axis=0)
        if "_gen_texts" in out:
            out["_gen_texts"] = {**out["_gen_texts"], "samples": [row for m in members for row in m["_gen_texts"]["samples"]]}
    return out


def eval_splits(cfg, dm) -> list[str]:
    return [s for s in cfg.eval.splits if dm.has(s)] + (["ood"] if dm.has("ood") else [])


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


def report(cfg, run_dir: Path, preds: dict[str, dict], logger, timings: dict) -> dict:
    """Score the (combined) predictions, save them and their plots, log to the logger; metrics per split."""
    n_bins = int(cfg.eval.get("n_bins", 15))
    metrics = {}
    for split, p in preds.items():
        if cfg.eval.get("save_predictions", True):
            atomic_npz(run_dir / "predictions" / f"{split}.npz", **{k: v for k, v in p.items() if not k.startswith("_")})
    for split, p in preds.items():
        if split == "ood":
            continue
        m = evaluate_predictions(p["probs"], p["labels"], n_bins=n_bins, samples=p.get("samples"))
        if "ood" in preds:
            o = preds["ood"]
            both = "samples" in p and "samples" in o
            m.update(evaluate_ood(p["probs"], o["probs"], samples_in=p["samples"] if both else None,
                                  samples_out=o["samples"] if both else None))
        uncertainty = {k[2:]: p[k] for k in p if k.startswith("u_")}  # per-example scores (e.g. AdUE's)
        if uncertainty:
            m.update(error_detection(cfg, run_dir, split, p, uncertainty, n_bins, logger))
        else:
            risk_coverage(cfg, run_dir, split, p, {}, logger)
        if cfg.eval.get("probabilistic", False):
            from uqlora.evaluation import probabilistic_report

            m.update(probabilistic_report(cfg, run_dir, split, p, logger))
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


def error_detection(cfg, run_dir: Path, split: str, p: dict, uncertainty: dict, n_bins: int, logger) -> dict:
    """Misclassification detection by each per-example uncertainty score, and their risk-coverage plot."""
    from uqlora.metrics import evaluate_error_detection

    correct = p["probs"].argmax(1) == p["labels"]
    m = evaluate_error_detection(uncertainty, correct, n_bins=n_bins, probability_scores=PROBABILITY_SCORES,
                                 error_probabilities={"sr": 1.0 - p["probs"].max(1)})  # SR's u is rescaled
    risk_coverage(cfg, run_dir, split, p, uncertainty, logger)
    return m


def risk_coverage(cfg, run_dir: Path, split: str, p: dict, uncertainty: dict, logger) -> Path:
    """Risk-coverage curves (legend: AURC) of the predictive's confidence scores -- max probability, negative
    entropy, and for sampling methods negative mutual information -- plus any per-example uncertainty
    ``u_*``; saved as ``plots/risk_coverage_<split>.png`` and logged (W&B image + table of the curves)."""
    from uqlora.metrics import mutual_information, neg_entropy, risk_coverage_curve, risk_coverage_plot

    correct = p["probs"].argmax(1) == p["labels"]
    scores = {"max_prob": p["probs"].max(1), "neg_entropy": neg_entropy(p["probs"])}
    if "samples" in p:
        scores["neg_mutual_information"] = -mutual_information(p["samples"])
    scores.update({name: -np.asarray(u, dtype=np.float64) for name, u in uncertainty.items()})
    curves = {name: risk_coverage_curve(sc, correct) for name, sc in scores.items()}
    plot = risk_coverage_plot(curves, run_dir / "plots" / f"risk_coverage_{split}.png",
                              title=f"{cfg.method.name} / {cfg.model.name} / {cfg.data.name}: {split}")
    log_image(logger, f"{split}/risk_coverage", plot)
    rows = []
    for name, (cov, risk) in curves.items():
        step = max(1, len(cov) // 100)  # at most ~100 points per curve
        rows += [[name, float(c), float(r)] for c, r in zip(cov[::step], risk[::step])]
    log_table(logger, f"{split}/risk_coverage_curve", ["score", "coverage", "risk"], rows)
    return plot


def _run_dir(cfg) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside @hydra.main (tests, notebooks)
        return Path(cfg.get("run_dir") or "outputs/manual")


def method_label(cfg) -> str:
    """The method option as chosen (``laplace_ll``, ``swag_lora``, ...; tables and run directories use it),
    falling back to the method class name outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("method")
    except ValueError:
        choice = None
    return str(choice or cfg.method.name)


def write_results(run_dir: Path, cfg, metrics: dict, timings: dict, extra: dict | None = None) -> dict:
    results = {
        "method": cfg.method.name, "method_label": method_label(cfg), "model": cfg.model.name, "data": cfg.data.name,
        "seed": int(cfg.seed),
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
    for split, m in results["metrics"].items():
        det = {k[len("errdet_"):-len("_auroc")]: v for k, v in m.items() if k.startswith("errdet_") and k.endswith("_auroc")}
        if det:
            print(f"error detection ROC-AUC ({split}): " + ", ".join(f"{k} {v:.3f}" for k, v in det.items()))
    prob_cfg = (results.get("config", {}).get("eval") or {}).get("prob") or {}
    for split, m in results["metrics"].items():
        if "prob_greedy" in m:
            ev = "accuracy" if prob_cfg.get("event", "correct") == "correct" else "event rate"
            print(f"probabilistic ({split}, n={int(m['prob_n_samples'])} answers/query, {100 * (1 - m['prob_alpha']):.0f}% "
                  f"bounds): greedy {ev} {100 * m['prob_greedy']:.1f}%, sampled {ev} {100 * m['prob_sampled_mean']:.1f}% "
                  f"in [{100 * m['prob_sampled_lower']:.1f}%, {100 * m['prob_sampled_upper']:.1f}%]; "
                  f"greedy right but sampling mostly wrong on {100 * m['prob_greedy_yes_sampled_no']:.1f}% of queries")
        if "gen_greedy" in m:
            print(f"free text ({split}, {int(m['gen_n_queries'])} queries x {int(m['gen_n_samples'])} samples, "
                  f"{prob_cfg.get('gen_score')}): greedy {m['gen_greedy']:.3f}, sampled "
                  f"{m['gen_sampled_mean']:.3f} in [{m['gen_sampled_lower']:.3f}, {m['gen_sampled_upper']:.3f}], "
                  f"best of n {m['gen_sampled_max_mean']:.3f}")
        ood = {k[len("ood_"):-len("_auroc")]: v for k, v in m.items() if k.startswith("ood_") and k.endswith("_auroc")}
        if ood:
            print(f"OOD AUROC ({split} vs {results.get('config', {}).get('data', {}).get('ood')}): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in ood.items()))
    for split in results["metrics"]:  # plain print: paths must not be wrapped
        print(f"reliability diagram ({split}): {run_dir / 'plots' / f'reliability_{split}.png'}")
    print(f"results: {run_dir / 'results.json'}", flush=True)


def _init_seed(cfg) -> int:
    """Seed of the LoRA initialisation and the data order (the splits always follow ``cfg.seed``)."""
    init = cfg.get("train", {}).get("init_seed")
    return int(cfg.seed) if init is None else int(init)


def _member_dir(run_dir: Path, m: int, num_models: int) -> Path:
    return run_dir if num_models == 1 else run_dir / "members" / str(m)


def load_map_run(cfg, method, member: int = 0) -> str:
    """Load the MAP adapter of a finished run (``method.map_run``) into ``method`` instead of training.
    The source run must have the same model (incl. LoRA and head) and the same data splits."""
    src = Path(str(cfg.method.map_run))
    scfg = load_run_config(src)
    if OmegaConf.to_container(scfg.model, resolve=True) != OmegaConf.to_container(cfg.model, resolve=True):
        diff = sorted(k for k in set(scfg.model) | set(cfg.model) if scfg.model.get(k) != cfg.model.get(k))
        raise UqloraError(f"method.map_run '{src}' used another model config (differs in {', '.join(diff)})")
    for key in ("name", "max_train_samples", "val_size", "calib_size"):
        if scfg.data.get(key) != cfg.data.get(key):
            raise UqloraError(f"method.map_run '{src}' used data.{key}={scfg.data.get(key)}, this run "
                              f"{cfg.data.get(key)}: the train/val splits would differ")
    if int(scfg.seed) != int(cfg.seed):
        raise UqloraError(f"method.map_run '{src}' used seed={scfg.seed} (data splits), this run seed={cfg.seed}")
    dirs = member_dirs(src)
    if member >= len(dirs):
        raise UqloraError(f"method.map_run '{src}' has {len(dirs)} member(s); member {member} was requested")
    method.backbone.load_trainable_state_dict(
        torch.load(dirs[member] / "checkpoints" / "adapter.pt", weights_only=True, map_location="cpu"))
    method.trains = False
    log.info("using the MAP adapter of %s (no training)", dirs[member])
    return str(dirs[member])


def fit_member(cfg, method, dm, member_dir: Path, logger, timings: dict, key: str, member: int = 0,
               ckpt_path: str | None = None) -> dict:
    """Fit one member (when its method trains; from ``ckpt_path`` when resuming), restore its best adapter,
    save its state."""
    ckpt = BestAdapterCheckpoint(member_dir / "checkpoints", monitor=cfg.train.get("monitor", "val/loss"))
    callbacks = [ckpt, CalibrationCallback(member_dir / "plots", n_bins=int(cfg.eval.get("n_bins", 15))),
                 RNGStateCheckpoint()]
    callbacks += method.extra_callbacks(member_dir)
    if cfg.train.get("early_stopping_patience"):
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks.append(EarlyStopping(monitor=ckpt.monitor, patience=int(cfg.train.early_stopping_patience)))
    if cfg.train.get("save_last", True):
        from lightning.pytorch.callbacks import ModelCheckpoint

        every = cfg.train.get("checkpoint_every_n_steps")
        callbacks.append(ModelCheckpoint(dirpath=member_dir / "checkpoints", filename="last", save_top_k=1,
                                         every_n_train_steps=int(every) if every else None,
                                         save_on_train_epoch_end=True, enable_version_counter=False))
    n_batches = -(-len(dm.records["train"]) // int(cfg.data.batch_size))
    trainer = build_trainer(cfg, member_dir, logger, callbacks, n_train_batches=n_batches,
                            inference_mode=not getattr(method, "needs_grad_in_predict", False))
    info: dict = {}
    if cfg.method.get("map_run"):
        info["map_run"] = load_map_run(cfg, method, member)
    if method.trains:
        method.prepare_fit(dm)
        t0 = time.perf_counter()
        if ckpt_path:
            _carry_best_adapter(Path(ckpt_path), ckpt.path)
            log.info("resuming %s from %s", member_dir, ckpt_path)
            info["resumed_from"] = str(ckpt_path)
        trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
        timings[f"fit{key}"] = round(time.perf_counter() - t0, 3)
        want_best = method.restore_best_after_fit and bool(cfg.train.get("restore_best", True))
        restored = want_best and ckpt.restore_best(method)
        info = {**info, "steps": int(trainer.global_step), "best_val_loss": ckpt.best if ckpt.best_step >= 0 else None,
                "best_step": ckpt.best_step if ckpt.best_step >= 0 else None, "restored_best": bool(restored),
                "final_train_loss": float(trainer.callback_metrics.get("train/loss_epoch", float("nan")))}
        if want_best and not restored:
            log.warning("no validation ran during training; reporting the final adapter")
    atomic_torch_save(method.backbone.trainable_state_dict(), member_dir / "checkpoints" / "adapter.pt")
    t0 = time.perf_counter()
    method.posthoc_fit(dm)
    timings[f"posthoc_fit{key}"] = round(time.perf_counter() - t0, 3)
    atomic_torch_save(method.method_state_dict(), member_dir / "checkpoints" / "method_state.pt")
    if getattr(method, "tuning", None):
        info["posthoc"] = dict(method.tuning)
        log_summary(logger, {f"posthoc{key}/{k}": (v[0] if isinstance(v, list) and len(v) == 1 else v)
                             for k, v in method.tuning.items() if isinstance(v, (int, float, list))})
    return {"trainer": trainer, **info}


def predict_member(cfg, method, dm, trainer, timings: dict, key: str, member: int = 0,
                   n_members: int = 1) -> dict[str, dict]:
    preds = {}
    for split in eval_splits(cfg, dm):
        t0 = time.perf_counter()
        preds[split] = predict(trainer, method, dm, split)
        timings[f"predict_{split}{key}"] = round(time.perf_counter() - t0, 3)
        if split != "ood" and cfg.eval.get("probabilistic", False) and cfg.eval.get("prob", {}).get("generate", False):
            from uqlora.evaluation import generation_eval

            t0 = time.perf_counter()
            preds[split].update(generation_eval(cfg, method, dm, split, member, n_members))
            timings[f"generate_{split}{key}"] = round(time.perf_counter() - t0, 3)
    return preds


def train(cfg: DictConfig):
    """Fit (M members), post-hoc fit, evaluate and write the run directory. Returns ``(metrics, objects)``.

    The run directory decides what happens first: one that already holds a complete ``results.json`` is
    skipped (``skip_complete``; re-running a sweep skips its finished members), one that holds an
    unfinished run's ``checkpoints/last.ckpt`` is continued when ``resume=true`` (and refused otherwise).
    A run that fails writes ``results.json`` with ``status: failed`` and the error before re-raising."""
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    validate_config(cfg)  # before the directory is touched: an impossible value changes nothing
    previous = read_results(run_dir)
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
        return _train(cfg, run_dir, resume_from)
    except Exception as e:
        record_failure(run_dir, cfg, e)
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


def _train(cfg: DictConfig, run_dir: Path, resume_from: list[str | None]):
    t_start = time.perf_counter()
    M = int(cfg.method.get("num_models", 1))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    files = data_files(cfg)
    info, head, records = load_task(cfg)
    timings["data"] = round(time.perf_counter() - t0, 3)
    logger = build_logger(cfg, run_dir)
    member_preds, members = [], []
    init_seed = _init_seed(cfg)
    for m in range(M):
        key = "" if M == 1 else f"_member{m}"
        method, dm = build_member(cfg, info, head, records, init_seed + m)
        fitted = fit_member(cfg, method, dm, _member_dir(run_dir, m, M), logger, timings, key, member=m,
                            ckpt_path=resume_from[m])
        trainer = fitted.pop("trainer")
        member_preds.append(predict_member(cfg, method, dm, trainer, timings, key, m, M))
        members.append({"init_seed": init_seed + m, **fitted})
    preds = {split: combine([mp[split] for mp in member_preds]) for split in member_preds[0]}
    metrics = report(cfg, run_dir, preds, logger, timings)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    extra = {"status": "complete", "splits": {k: len(v) for k, v in records.items()}, "num_models": M,
             "train": members[0] if M == 1 else members, "data_files": files}
    results = write_results(run_dir, cfg, metrics, timings, extra)
    log_results_table(logger, results)
    if cfg.get("print_table", True):
        print_table(results, run_dir)
    return metrics, {"method": method, "datamodule": dm, "trainer": trainer, "run_dir": run_dir, "results": results}


def load_run_config(run_dir: str | Path) -> DictConfig:
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise UqloraError(f"'{run_dir}' is not a run directory (no .hydra/config.yaml)")
    return OmegaConf.load(path)


def member_dirs(run_dir: Path) -> list[Path]:
    """The folders holding ``checkpoints/adapter.pt`` of a run: itself, or its ``members/<m>``."""
    members = sorted((run_dir / "members").glob("*/checkpoints/adapter.pt"), key=lambda p: int(p.parents[1].name))
    dirs = [p.parents[1] for p in members] or [run_dir]
    if not (dirs[0] / "checkpoints" / "adapter.pt").is_file():
        raise UqloraError(f"run directory '{run_dir}' has no checkpoints/adapter.pt")
    return dirs


def run_predictions(run_dir: str | Path, cfg: DictConfig, records: list[dict], work_dir: Path) -> dict[str, np.ndarray]:
    """The predictive of a finished run (all of its members pooled) on ``records`` of ``cfg``'s dataset --
    e.g. a teacher's on this run's training examples. The run may use another model (its own tokenizer and
    head); it must have the same task and number of classes."""
    src = Path(run_dir)
    scfg = load_run_config(src)
    info = task_info(cfg.data)
    sinfo = task_info(scfg.data)
    if (sinfo.task, sinfo.num_classes) != (info.task, info.num_classes):
        raise UqloraError(f"run '{src}' was trained for {sinfo.task} with {sinfo.num_classes} classes "
                          f"({scfg.data.name}); this data ({cfg.data.name}) is {info.task} with {info.num_classes}")
    scfg.data = cfg.data
    for key in ("progress_bar", "trainer"):
        if cfg.get(key) is not None:
            scfg[key] = cfg[key]
    head = resolve_head(scfg.model, info.task)
    method, dm = build_member(scfg, info, head, {"given": list(records)}, _init_seed(scfg))
    trainer = build_trainer(scfg, work_dir, False, [], inference_mode=not getattr(method, "needs_grad_in_predict", False))
    preds = []
    for mdir in member_dirs(src):
        method.backbone.load_trainable_state_dict(
            torch.load(mdir / "checkpoints" / "adapter.pt", weights_only=True, map_location="cpu"))
        state = mdir / "checkpoints" / "method_state.pt"
        method.load_method_state_dict(torch.load(state, weights_only=True, map_location="cpu") if state.is_file() else {})
        preds.append(predict(trainer, method, dm, "given"))
    return combine(preds)


def evaluate_run(ecfg: DictConfig):
    """Re-evaluate finished run directories from their saved adapters and method states, without retraining:
    ``run_dir`` (one run, all of its members) or ``ensemble=[dir1, dir2, ...]`` (runs combined, e.g. the
    members of a multirun). Optionally on another data config; writes into a fresh directory."""
    t_start = time.perf_counter()
    sources = [Path(d) for d in (ecfg.get("ensemble") or [ecfg.run_dir])]
    cfgs = [load_run_config(d) for d in sources]
    cfg = cfgs[0]
    for other, d in zip(cfgs[1:], sources[1:]):
        for key in ("model", "data"):
            if OmegaConf.to_container(other[key]) != OmegaConf.to_container(cfg[key]):
                raise UqloraError(f"ensemble member '{d}' has a different {key} config than '{sources[0]}'")
    if ecfg.get("data") is not None:
        cfg.data = ecfg.data
    for key in ("eval", "logger"):
        if ecfg.get(key) is not None:
            cfg[key] = OmegaConf.merge(cfg.get(key) or {}, ecfg[key])
    validate_config(cfg)
    out_dir = _run_dir(ecfg)
    files = data_files(cfg)
    info, head, records = load_task(cfg)
    logger = build_logger(cfg, out_dir) if ecfg.get("log", False) else False
    timings: dict[str, float] = {}
    member_preds = []
    n_members = sum(len(member_dirs(src)) for src in sources)
    for src, src_cfg in zip(sources, cfgs):
        src_cfg.data = cfg.data
        # one model per source run: its members differ only in the adapter and method state loaded below
        method, dm = build_member(src_cfg, info, head, records, _init_seed(src_cfg))
        trainer = build_trainer(cfg, out_dir, logger, [],
                                inference_mode=not getattr(method, "needs_grad_in_predict", False))
        for mdir in member_dirs(src):
            method.backbone.load_trainable_state_dict(
                torch.load(mdir / "checkpoints" / "adapter.pt", weights_only=True, map_location="cpu"))
            state = mdir / "checkpoints" / "method_state.pt"
            method.load_method_state_dict(torch.load(state, weights_only=True, map_location="cpu")
                                          if state.is_file() else {})
            member_preds.append(predict_member(cfg, method, dm, trainer, timings, f"_{len(member_preds)}",
                                               len(member_preds), n_members))
    preds = {split: combine([mp[split] for mp in member_preds]) for split in member_preds[0]}
    metrics = report(cfg, out_dir, preds, logger, timings)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    results = write_results(out_dir, cfg, metrics, timings, {"source_runs": [str(s) for s in sources],
                                                            "num_models": len(member_preds), "data_files": files})
    log_results_table(logger, results)
    if ecfg.get("print_table", True):
        print_table(results, out_dir)
    return metrics, {"method": method, "datamodule": dm, "run_dir": out_dir, "results": results}
