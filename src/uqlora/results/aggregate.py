"""Aggregate complete runs into tables: one per model x metric, rows = methods (or uncertainty scores),
columns = datasets, every cell the mean +- sample standard deviation (ddof=1) over the seeds; the best printed
mean of each column is bold (all of them on a tie).

Which way is better comes from the metric's name (:func:`higher_is_better`). Error-detection metrics of a run
(``errdet_<score>_<metric>``) form the ``errdet`` view: rows are the scores of an AdUE run (``sr``, ``entropy``,
``mahalanobis``, ``adue``), ``<method>:<score>`` for another method's run.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from uqlora.results.collect import Run, TablesError, split_runs
from uqlora.results.names import SCORE_NAMES, method_names, method_order, score_order

DEFAULT_METRICS = ("acc", "mean_confidence", "ece", "nll", "brier", "aurc", "auroc_misclf",
                   "ood_max_prob_auroc", "ood_max_prob_fpr95", "ood_neg_mutual_information_auroc",
                   "gsm8k_acc", "rouge_l")  # the last two: generation runs (token-level SFT)
ERRDET_METRICS = ("auroc", "auprc", "aurc", "ece")
PERCENT = re.compile(r"(^|_)(acc|ece|mce|mean_confidence)$")  # mean confidence next to ACC: over- or underconfident
LOWER = re.compile(r"(^|_)(ece|mce|nll|brier|aurc|eaurc|fpr95)(_|$)")
HIGHER = re.compile(r"(^|_)(acc|auroc|auprc|aupr_in|aupr_out|rouge_l)(_|$)")
ERRDET = re.compile(r"errdet_(.+)_(auroc|auprc|aurc|ece)")
VIEWS = ("methods", "errdet")
ERRDET_METHOD = "adue"  # the method whose error-detection scores are rows of their own


def higher_is_better(metric: str) -> bool | None:
    """True for accuracy / AUROC / AUPRC, False for ECE / NLL / Brier / AURC / FPR@95, None otherwise."""
    if LOWER.search(metric):
        return False
    if HIGHER.search(metric):
        return True
    return None


def observations(runs: list[Run], split: str = "test") -> list[dict]:
    """Long format: one dict per (run, metric) with model, data, row, seed, metric, value, view. Rows are
    method labels; error-detection metrics become rows ``<score>`` (AdUE runs) or ``<method>:<score>`` under
    metric ``errdet_<m>`` in view ``errdet``. NaN values (e.g. misclassification AUROC with no error) leave
    their cell, whose n shows it."""
    out = []
    for r in runs:
        m = r.metrics.get(split)
        if not isinstance(m, dict):
            continue
        for key, value in m.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            row, metric, view = r.method, key, "methods"
            hit = ERRDET.fullmatch(key)
            if hit:
                score = hit.group(1)
                row = score if r.method == ERRDET_METHOD else f"{r.method}:{score}"
                metric, view = f"errdet_{hit.group(2)}", "errdet"
            out.append({"model": r.model, "data": r.data, "row": row, "seed": r.seed, "metric": metric,
                        "value": float(value), "view": view, "run": r})
    return out


@dataclass
class Cell:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else math.nan


@dataclass
class Table:
    model: str
    metric: str
    split: str
    view: str
    rows: list[str]
    cols: list[str]
    cells: dict[tuple[str, str], Cell]
    names: dict[str, str] = field(default_factory=dict)  # row label -> printed name

    @property
    def key(self) -> str:
        return f"{self.model}_{self.metric}"

    def fmt(self, v: float) -> str:
        if not math.isfinite(v):
            return "nan"
        return f"{100 * v:.1f}" if PERCENT.search(self.metric) else f"{v:.3f}"

    def best(self, col: str) -> set[str]:
        """Rows with the best printed mean in this column (all of them on a tie)."""
        hib = higher_is_better(self.metric)
        vals = {r: self.cells[(r, col)].mean for r in self.rows if (r, col) in self.cells}
        vals = {r: float(self.fmt(v)) for r, v in vals.items() if math.isfinite(v)}
        if hib is None or not vals:
            return set()
        target = max(vals.values()) if hib else min(vals.values())
        return {r for r, v in vals.items() if v == target}

    @property
    def n_max(self) -> int:
        return max((c.n for c in self.cells.values()), default=0)

    def row_name(self, row: str) -> str:
        return self.names.get(row, row)


def _check(values: Iterable[str], valid: tuple[str, ...], what: str) -> list[str]:
    values = list(values)
    for v in values:
        if v not in valid:
            raise TablesError(f"unknown {what} '{v}'; valid choices: {', '.join(valid)}")
    return values


def build_tables(runs: list[Run], split: str = "test", metrics: Iterable[str] | None = None,
                 views: Iterable[str] = VIEWS) -> list[Table]:
    """One table per model x metric over the complete runs (the newest of duplicates): rows = methods in
    :func:`uqlora.results.names.method_order` (or error-detection scores), columns = datasets as found."""
    views = _check(views, VIEWS, "view")
    used, _, _ = split_runs(runs)
    obs = observations(used, split)
    available = {(o["view"], o["metric"]) for o in obs}
    if metrics is None:
        wanted = [("methods", m) for m in DEFAULT_METRICS] + [("errdet", f"errdet_{m}") for m in ERRDET_METRICS]
        wanted = [w for w in wanted if w in available and w[0] in views]
    else:
        wanted = []
        names = sorted({m for _, m in available})
        for m in metrics:
            hits = [w for w in available if w[1] == m and w[0] in views]
            if not hits:
                raise TablesError(f"unknown metric '{m}' for split '{split}'; metrics in these runs: "
                                  f"{', '.join(names) or '(none)'}")
            wanted += sorted(hits)
    order = {m: i for i, m in enumerate(method_order(runs))}
    labels = method_names(used)
    models = list(dict.fromkeys(o["model"] for o in obs))
    tables = []
    for view, metric in wanted:
        for model in models:
            sel = [o for o in obs if o["model"] == model and o["metric"] == metric and o["view"] == view]
            if not sel:
                continue
            cols = list(dict.fromkeys(o["data"] for o in sel))
            rows = list(dict.fromkeys(o["row"] for o in sel))
            rows = score_order(rows) if view == "errdet" else sorted(rows, key=order.__getitem__)
            cells: dict[tuple[str, str], Cell] = {}
            for o in sel:
                cells.setdefault((o["row"], o["data"]), Cell([])).values.append(o["value"])
            names = {r: SCORE_NAMES.get(r, r) for r in rows} if view == "errdet" else {r: labels[r] for r in rows}
            tables.append(Table(model, metric, split, view, rows, cols, cells, names))
    return tables


def summary_rows(tables: list[Table]) -> list[dict]:
    """The cells of ``tables`` in long format (``summary.csv``)."""
    rows = []
    for t in tables:
        for (row, col), c in t.cells.items():
            rows.append({"model": t.model, "split": t.split, "metric": t.metric, "row": row, "data": col,
                         "mean": c.mean, "std": c.std, "n": c.n, "best": row in t.best(col)})
    return rows


def summary_frame(tables: list[Table]):
    """:func:`summary_rows` as a pandas DataFrame (for notebooks; needs pandas)."""
    import pandas as pd

    return pd.DataFrame(summary_rows(tables), columns=["model", "split", "metric", "row", "data", "mean", "std",
                                                       "n", "best"])
