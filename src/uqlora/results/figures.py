"""Figures from run directories' saved predictions (``predictions/<split>.npz``) and from the tables:
reliability diagrams pooled over seeds, risk-coverage curves (mean over seeds, band: min-max; every per-example
uncertainty ``u_<score>`` a run saved, e.g. AdUE's error-detection scores, gets its own curve) and accuracy /
ECE bar charts with std error bars. Each figure is written as PDF and PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from uqlora.results.aggregate import ERRDET_METHOD, PERCENT, Table
from uqlora.results.collect import Run, TablesError, split_runs
from uqlora.results.names import DATA_NAMES, METRIC_NAMES, SCORE_NAMES, method_names, method_order
from uqlora.results.render import slug
from uqlora.rundir import RunDir

FIGURES = ("reliability", "risk_coverage", "bars")


def _predictions(run: Run, split: str) -> dict | None:
    if run.path is None or not RunDir(run.path).predictions_path(split).is_file():
        return None
    return RunDir(run.path).predictions(split)


def _top_label(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of each prediction row: the examples, or the next tokens of a generation run."""
    if "tok_conf" in p:
        return np.asarray(p["tok_conf"], dtype=float), np.asarray(p["tok_correct"], dtype=bool)
    return p["probs"].max(1), p["probs"].argmax(1) == p["labels"]


def groups(runs: list[Run]) -> dict[tuple[str, str], dict[str, list[Run]]]:
    """The complete runs by (model, data), then by method label in row order."""
    used, _, _ = split_runs(runs)
    out: dict[tuple[str, str], dict[str, list[Run]]] = {}
    for r in used:
        out.setdefault((r.model, r.data), {}).setdefault(r.method, []).append(r)
    order = method_order(runs)
    return {k: {m: v[m] for m in order if m in v} for k, v in out.items()}


def pooled_reliability(runs: list[Run], split: str, n_bins: int = 15) -> dict | None:
    """Reliability bins of the seeds' predictions pooled (counts added, accuracy/confidence count-weighted);
    None when no run has ``predictions/<split>.npz``."""
    from uqlora.metrics.calibration import confidence_bins

    acc = conf = count = None
    for r in runs:
        p = _predictions(r, split)
        if p is None:
            continue
        b = confidence_bins(*_top_label(p), n_bins=n_bins)
        c = b["count"].astype(float)
        if count is None:
            edges, acc, conf, count = b["edges"], np.zeros(n_bins), np.zeros(n_bins), np.zeros(n_bins)
        acc += np.nan_to_num(b["accuracy"]) * c
        conf += np.nan_to_num(b["confidence"]) * c
        count += c
    if count is None:
        return None
    nz = count > 0
    acc_b = np.where(nz, acc / np.maximum(count, 1), np.nan)
    conf_b = np.where(nz, conf / np.maximum(count, 1), np.nan)
    ece = float(np.sum(count[nz] / count.sum() * np.abs(acc_b[nz] - conf_b[nz])))
    return {"edges": edges, "accuracy": acc_b, "confidence": conf_b, "count": count, "ece": ece}


def mean_risk_coverage(runs: list[Run], split: str, grid: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per confidence score -- max probability for every method, plus each per-example uncertainty
    ``u_<score>`` a run saved -- the risk on the coverage ``grid`` for every seed (``risk``: [n_seeds, len(grid)])
    and each seed's exact AURC (``aurc``: [n_seeds], the mean selective risk over k = 1..N)."""
    from uqlora.metrics import risk_coverage_curve

    out: dict[str, dict[str, list]] = {}
    for r in runs:
        p = _predictions(r, split)
        if p is None:
            continue
        conf, correct = _top_label(p)
        scores = {"max_prob": conf}
        scores.update({k[2:]: -np.asarray(p[k], dtype=float) for k in p if k.startswith("u_")})
        for name, s in scores.items():
            cov, risk = risk_coverage_curve(s, correct)
            d = out.setdefault(name, {"risk": [], "aurc": []})
            d["risk"].append(np.interp(grid, cov, risk))
            d["aurc"].append(float(np.mean(risk)))
    return {k: {"risk": np.stack(v["risk"]), "aurc": np.asarray(v["aurc"])} for k, v in out.items()}


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("pdf", "png"):
        p = out_dir / f"{stem}.{ext}"
        fig.savefig(p, format=ext, dpi=150, bbox_inches="tight")
        paths.append(p)
    return paths


def reliability_figure(method_runs: dict[str, list[Run]], split: str, title: str, out_dir: Path, stem: str,
                       n_bins: int = 15, names: dict[str, str] | None = None) -> list[Path]:
    """One reliability diagram per method (seeds pooled), side by side."""
    from matplotlib.figure import Figure

    names = names or {}
    pooled = {m: pooled_reliability(rs, split, n_bins) for m, rs in method_runs.items()}
    pooled = {m: b for m, b in pooled.items() if b is not None}
    if not pooled:
        return []
    k = len(pooled)
    fig = Figure(figsize=(2.6 * k, 2.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, k, sharey=True))
    for ax, (m, b) in zip(axes, pooled.items()):
        nz = b["count"] > 0
        left, width = b["edges"][:-1][nz], np.diff(b["edges"])[nz]
        ax.bar(left, b["accuracy"][nz], width=width, align="edge", color="tab:blue", edgecolor="black",
               linewidth=0.5, label="accuracy")
        lo = np.minimum(b["accuracy"][nz], b["confidence"][nz])
        ax.bar(left, np.abs(b["accuracy"][nz] - b["confidence"][nz]), bottom=lo, width=width, align="edge",
               color="tab:red", alpha=0.35, edgecolor="tab:red", linewidth=0.5, label="gap")
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        n = len(method_runs[m])
        ax.set_title(f"{names.get(m, m)}\nECE {100 * b['ece']:.1f}% ({n} seed{'s' * (n != 1)})", fontsize=9)
        ax.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out_dir, stem)


def risk_coverage_figure(method_runs: dict[str, list[Run]], split: str, title: str, out_dir: Path,
                         stem: str, names: dict[str, str] | None = None) -> list[Path]:
    """Risk-coverage curves of every method and saved score: the mean over seeds, band: min-max."""
    from matplotlib.figure import Figure

    names = names or {}
    grid = np.linspace(0.01, 1.0, 100)
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for m, rs in method_runs.items():
        name = names.get(m, m)
        for score, curve in mean_risk_coverage(rs, split, grid).items():
            risks = curve["risk"]
            if score == "max_prob":
                label = name
            elif m == ERRDET_METHOD:  # the error-detection scores of an AdUE run
                label = f"{name} run: {SCORE_NAMES.get(score, score)}"
            else:
                label = f"{name} ({score})"
            line, = ax.plot(grid, risks.mean(0), label=f"{label} (AURC {curve['aurc'].mean():.3f})")
            if len(risks) > 1:
                ax.fill_between(grid, risks.min(0), risks.max(0), color=line.get_color(), alpha=0.15)
            drawn += 1
    if not drawn:
        return []
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage")
    ax.set_ylabel("selective risk (error rate)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, stem)


def bar_figure(tables: list[Table], model: str, out_dir: Path, metrics=("acc", "ece")) -> list[Path]:
    """Grouped bars (mean, error bar: std over seeds) of the methods' tables of ``model``, one panel per metric."""
    from matplotlib.figure import Figure

    sel = [t for m in metrics for t in tables if t.model == model and t.metric == m and t.view == "methods"]
    if not sel:
        return []
    fig = Figure(figsize=(max(5.0, 1.3 * len(sel[0].cols) + 2), 2.8 * len(sel)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(sel), 1, squeeze=False)[:, 0])
    for ax, t in zip(axes, sel):
        x = np.arange(len(t.cols))
        w = 0.8 / max(1, len(t.rows))
        scale = 100 if PERCENT.search(t.metric) else 1
        for i, r in enumerate(t.rows):
            means = [scale * t.cells[(r, c)].mean if (r, c) in t.cells else np.nan for c in t.cols]
            stds = [scale * np.nan_to_num(t.cells[(r, c)].std) if (r, c) in t.cells else 0.0 for c in t.cols]
            ax.bar(x + (i - (len(t.rows) - 1) / 2) * w, means, width=w, yerr=stds, capsize=2, label=t.row_name(r))
        ax.set_xticks(x, [DATA_NAMES.get(c, c) for c in t.cols])
        ax.set_ylabel(METRIC_NAMES.get(t.metric, t.metric) + (" (%)" if scale == 100 else ""))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=min(5, len(sel[0].rows)), loc="lower left", bbox_to_anchor=(0, 1.02))
    fig.suptitle(f"{model}, {sel[0].split} (mean ± std over seeds)", fontsize=10)
    return _save(fig, out_dir, slug("bars", model))


def make_figures(runs: list[Run], tables: list[Table], out_dir: Path, split: str = "test",
                 kinds: Iterable[str] = FIGURES) -> tuple[list[Path], list[str]]:
    """Write the figures; returns (paths, notes about runs without saved predictions)."""
    kinds = list(kinds)
    for k in kinds:
        if k not in FIGURES:
            raise TablesError(f"unknown figure '{k}'; valid choices: {', '.join(FIGURES)}")
    out_dir = Path(out_dir)
    paths, notes = [], []
    names = method_names(split_runs(runs)[0])
    for (model, data), method_runs in groups(runs).items():
        for rs in method_runs.values():
            lacking = [r for r in rs if r.path is not None and not RunDir(r.path).predictions_path(split).is_file()]
            if lacking:
                notes.append(f"no predictions/{split}.npz (figures skip it): "
                             + "; ".join(r.describe() for r in lacking))
        title = f"{DATA_NAMES.get(data, data)} -- {model}, {split}"
        if "reliability" in kinds:
            paths += reliability_figure(method_runs, split, title, out_dir, slug("reliability", model, data, split),
                                        names=names)
        if "risk_coverage" in kinds:
            paths += risk_coverage_figure(method_runs, split, title, out_dir,
                                          slug("risk_coverage", model, data, split), names=names)
    if "bars" in kinds:
        for model in dict.fromkeys(t.model for t in tables):
            paths += bar_figure(tables, model, out_dir)
    return paths, notes
