"""Score predictions and record them: metrics per split, plots (reliability diagrams, risk-coverage curves,
probabilistic bounds), logger output (W&B images, tables, summary), ``results.json`` and the printed table."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from uqlora.io import atomic_npz
from uqlora.logging_utils import log_image, log_summary, log_table
from uqlora.metrics import evaluate_ood, evaluate_predictions, reliability_bins, reliability_diagram
from uqlora.rundir import RunDir

TABLE_KEYS = ("acc", "ece", "nll", "brier")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("uqlora", "torch", "lightning", "transformers", "peft", "hydra-core", "torchmetrics", "wandb"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _hardware(cfg) -> dict:
    """Where the numbers were computed: the effective precision (``auto`` resolved), the CPU's vector
    instructions and the GPU, if any."""
    import torch

    from uqlora.models.precision import cpu_has_native_bf16, effective_precision

    trainer = cfg.get("trainer") or {}
    model = cfg.get("model") or {}
    accelerator = str(trainer.get("accelerator", "cpu"))
    return {"precision": effective_precision(model.get("precision", trainer.get("precision", "32-true")), accelerator),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": cpu_has_native_bf16(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


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


def report(cfg, run_dir: Path, preds: dict[str, dict], logger, probability_scores: tuple[str, ...] = ()) -> dict:
    """Score the (combined) predictions, save them and their plots, log to the logger; metrics per split."""
    n_bins = int(cfg.eval.get("n_bins", 15))
    metrics = {}
    for split, p in preds.items():
        if cfg.eval.get("save_predictions", True):
            atomic_npz(run_dir / "predictions" / f"{split}.npz", **{k: v for k, v in p.items() if not k.startswith("_")})
    for split, p in preds.items():
        if split == "ood" and not _labelled(p):  # plain texts of another task: detection metrics only (below)
            continue
        if "n_tokens" in p:  # a generation split (token-level SFT): its own arrays and metrics
            from uqlora.sft_eval import report_split

            metrics[split] = report_split(cfg, run_dir, split, p, logger)
            continue
        m = evaluate_predictions(p["probs"], p["labels"], n_bins=n_bins, samples=p.get("samples"))
        if "ood" in preds and split != "ood":
            o = preds["ood"]
            both = "samples" in p and "samples" in o
            m.update(evaluate_ood(p["probs"], o["probs"], samples_in=p["samples"] if both else None,
                                  samples_out=o["samples"] if both else None))
        uncertainty = {k[2:]: p[k] for k in p if k.startswith("u_")}  # per-example scores (e.g. AdUE's)
        if uncertainty:
            m.update(error_detection(cfg, run_dir, split, p, uncertainty, n_bins, logger, probability_scores))
        else:
            risk_coverage(cfg, run_dir, split, p, {}, logger)
        if cfg.eval.get("probabilistic", False) and split != "ood":
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


def _labelled(p: dict) -> bool:
    """An ``ood`` split of the model's own kind of task (multiple-choice questions of another dataset) keeps its
    answers, so it is scored as a shifted test set too (accuracy, ECE, NLL under the shift)."""
    labels = np.asarray(p["labels"])
    return labels.size > 0 and bool((labels >= 0).all()) and "n_tokens" not in p


def error_detection(cfg, run_dir: Path, split: str, p: dict, uncertainty: dict, n_bins: int, logger,
                    probability_scores: tuple[str, ...] = ()) -> dict:
    """Misclassification detection by each per-example uncertainty score, and their risk-coverage plot."""
    from uqlora.metrics import evaluate_error_detection

    correct = p["probs"].argmax(1) == p["labels"]
    m = evaluate_error_detection(uncertainty, correct, n_bins=n_bins, probability_scores=probability_scores,
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


def write_results(run_dir: Path, cfg, metrics: dict, timings: dict, extra: dict | None = None,
                  label: str | None = None) -> dict:
    results = {
        "method": cfg.method.name, "method_label": label or str(cfg.method.name), "model": cfg.model.name, "data": cfg.data.name,
        "seed": int(cfg.seed),
        "run_dir": str(run_dir), "metrics": metrics, "timings": timings, **(extra or {}),
        "hardware": _hardware(cfg), "versions": _versions(), "git": _git(), "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    }
    RunDir(run_dir).write_results(results)
    return results


def print_table(results: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['method']} | {results['model']} | {results['data']} | seed {results['seed']}")
    table.add_column("split")
    for k in TABLE_KEYS:
        table.add_column(k.upper(), justify="right")
    ood_name = (results.get("config", {}).get("data") or {}).get("ood")
    for split, m in results["metrics"].items():
        table.add_row(f"ood: {ood_name}" if split == "ood" else split, *(f"{100 * m[k]:.1f}%" if k in ("acc", "ece") else f"{m[k]:.3f}" for k in TABLE_KEYS))
    Console().print(table)
    from uqlora.sft_eval import summary_line

    for line in filter(None, (summary_line(split, m) for split, m in results["metrics"].items())):
        print(line)
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
