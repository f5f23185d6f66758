"""Paper tables and figures from logged runs: run directories (a multirun folder, several folders) or W&B.

    python experiments/make_tables.py multirun/laplace_lora/<stamp> --out tables/laplace_lora
    python experiments/make_tables.py multirun/a multirun/b --metrics acc,ece,nll --split test
    python experiments/make_tables.py --wandb <entity>/<project> --group laplace_lora --out tables/ll
    make tables RUNS=multirun/laplace_lora/<stamp>        (OUT defaults to <RUNS>/tables)

Runs are grouped by model x dataset x method; every cell is the mean +- sample standard deviation over the
seeds (n shown when a cell has fewer seeds than the others), and the best value of each column (dataset) is
bold: the maximum for accuracy / AUROC / AUPRC, the minimum for ECE / MCE / NLL / Brier / AURC / FPR@95 (ties
at the printed precision are all bold). Runs of the AdUE method add an error-detection table per metric with
one row per uncertainty score (softmax response, entropy, Mahalanobis, AdUE: `errdet_<score>_<metric>`).

Written to --out: `tables.md` (all tables and the list of missing / failed runs), `tables.tex` (booktabs
tables; one file per table under `tex/` for \\input), `summary.csv` (long format), and `figures/*.pdf|png`:
reliability diagrams pooled over seeds from `predictions/<split>.npz`, risk-coverage curves (mean over seeds),
and accuracy / ECE bar charts with std error bars.

A run directory is any folder with `.hydra/` or `results.json`. A run counts as complete when its
`results.json` parses and either says `"status": "complete"` or has no status but has `metrics`. Runs without
`results.json` (still running or killed), with a truncated / unparsable one, or with `"status": "failed"` are
listed -- on stdout and in `tables.md` -- never silently dropped; so are the jobs of a sweep folder
(`multirun.yaml`) that never started, and duplicate runs of the same cell (the newest is used).
`--strict` makes any of these exit with status 1.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import yaml

COMPLETE, FAILED, MISSING, UNREADABLE, NOT_STARTED = "complete", "failed", "missing", "unreadable", "not started"
DEFAULT_METRICS = ("acc", "ece", "nll", "brier", "aurc", "auroc_misclf",
                   "ood_max_prob_auroc", "ood_max_prob_fpr95", "ood_neg_mutual_information_auroc")
ERRDET_METRICS = ("auroc", "auprc", "aurc", "ece")
PERCENT = re.compile(r"(^|_)(acc|ece|mce)$")
LOWER = re.compile(r"(^|_)(ece|mce|nll|brier|aurc|eaurc|fpr95)(_|$)")
HIGHER = re.compile(r"(^|_)(acc|auroc|auprc|aupr_in|aupr_out)(_|$)")
VIEWS = ("methods", "errdet")
FIGURES = ("reliability", "risk_coverage", "bars")

METHOD_NAMES = {
    "map": "MAP", "temperature": "Temperature", "mc_dropout": "MC dropout", "ensemble": "Ensemble",
    "swag": "SWAG", "multiswag": "MultiSWAG", "swag_lora": "SWAG", "multiswag_lora": "MultiSWAG",
    "laplace_ll": "LLLA", "laplace": "Laplace-LoRA", "ual": "UAL", "adue": "AdUE",
}
METHOD_ORDER = ("map", "temperature", "mc_dropout", "ensemble", "swag", "swag_lora", "multiswag",
                "multiswag_lora", "laplace_ll", "laplace", "ual", "adue")
SCORE_NAMES = {"sr": "SR", "entropy": "Entropy", "mahalanobis": "Mahalanobis", "adue": "AdUE"}
SCORE_ORDER = ("sr", "entropy", "mahalanobis", "adue")
DATA_NAMES = {
    "wg_s": "WG-S", "wg_m": "WG-M", "arc_c": "ARC-C", "arc_e": "ARC-E", "obqa": "OBQA", "boolq": "BoolQ",
    "cqa": "CQA", "mmlu": "MMLU", "sst2": "SST-2", "sst5": "SST-5", "cola": "CoLA", "agnews": "AG News",
    "20ng": "20NG", "tweeteval_hate": "TweetEval-hate", "tweeteval_offensive": "TweetEval-offensive",
}
METRIC_NAMES = {
    "acc": "ACC", "ece": "ECE", "mce": "MCE", "nll": "NLL", "brier": "Brier", "aurc": "AURC", "eaurc": "E-AURC",
    "auroc_misclf": "AUROC (misclassification)", "auprc_misclf": "AUPRC (misclassification)",
    "errdet_auroc": "error-detection ROC-AUC", "errdet_auprc": "error-detection AUPRC",
    "errdet_aurc": "error-detection AURC", "errdet_ece": "ECE of u as P(error)",
}


class TablesError(Exception):
    """Bad input: printed as one line ``error: ...`` by :func:`main`."""


# ----------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    path: Path | None
    status: str
    method: str = "?"            # the label the tables use (e.g. laplace_ll), see method_label()
    model: str = "?"
    data: str = "?"
    seed: int | None = None
    error: str = ""
    results: dict = field(default_factory=dict)
    mtime: float = 0.0

    @property
    def metrics(self) -> dict:
        return self.results.get("metrics") or {}

    @property
    def cell(self) -> tuple:
        return (self.model, self.data, self.method, self.seed)

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.method} / {self.model} / {self.data} / seed {self.seed}{where}"


def method_label(name: str | None, method_cfg: dict | None = None, choice: str | None = None,
                 explicit: str | None = None) -> str:
    """The name a run's method gets in tables: an explicit label (results.json ``method_label``), else the
    Hydra option that selected it (``laplace_ll``, ``swag_lora``: ``.hydra/hydra.yaml`` runtime choices),
    else ``laplace_ll`` for a Laplace run with ``method.subset=last_layer``, else ``method.name``."""
    if explicit:
        return str(explicit)
    if choice and "/" not in str(choice):
        return str(choice)
    method_cfg = method_cfg or {}
    name = str(name or method_cfg.get("name") or "?")
    if name == "laplace" and method_cfg.get("subset") == "last_layer":
        return "laplace_ll"
    return name


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _hydra_choice(run_dir: Path, group: str) -> str | None:
    choices = ((_load_yaml(run_dir / ".hydra" / "hydra.yaml").get("hydra") or {}).get("runtime") or {}).get("choices")
    return (choices or {}).get(group)


def read_run(run_dir: Path) -> Run:
    """One run directory -> :class:`Run` with its status (complete / failed / missing / unreadable)."""
    run_dir = Path(run_dir)
    cfg = _load_yaml(run_dir / ".hydra" / "config.yaml")
    res_path = run_dir / "results.json"
    results: dict = {}
    status, error = COMPLETE, ""
    if not res_path.is_file():
        status, error = MISSING, "no results.json (still running, or stopped before writing it)"
    else:
        try:
            results = json.loads(res_path.read_text())
            if not isinstance(results, dict):
                raise ValueError(f"top level is a {type(results).__name__}, not an object")
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            results = {}
            msg = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            status, error = UNREADABLE, f"results.json is truncated or not JSON ({msg})"
        else:
            st = results.get("status")
            if st == "failed":
                status, error = FAILED, str(results.get("error") or "failed without an error message")
            elif st not in (None, "complete"):
                status, error = FAILED, f"unknown status {st!r} in results.json (valid: complete, failed)"
            elif not isinstance(results.get("metrics"), dict) or not results["metrics"]:
                status, error = UNREADABLE, "results.json has no metrics"
    rcfg = results.get("config") if isinstance(results.get("config"), dict) else cfg
    mcfg = (rcfg or {}).get("method") or {}
    seed = results.get("seed", (rcfg or {}).get("seed"))
    return Run(
        path=run_dir, status=status, error=error, results=results,
        method=method_label(results.get("method") or mcfg.get("name"), mcfg, _hydra_choice(run_dir, "method"),
                            results.get("method_label")),
        model=str(results.get("model") or ((rcfg or {}).get("model") or {}).get("name") or "?"),
        data=str(results.get("data") or ((rcfg or {}).get("data") or {}).get("name") or "?"),
        seed=None if seed is None else int(seed),
        mtime=res_path.stat().st_mtime if res_path.is_file() else 0.0,
    )


def _is_run_dir(d: Path) -> bool:
    return (d / ".hydra").is_dir() or (d / "results.json").is_file()


def discover(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """Run directories and sweep folders (with ``multirun.yaml``) under ``paths``."""
    runs, sweeps = [], []
    for root in map(Path, paths):
        if not root.exists():
            raise TablesError(f"'{root}' does not exist; pass a run directory or a multirun folder")
        if _is_run_dir(root):
            runs.append(root)
            continue
        found, n_sweeps = [], len(sweeps)
        for dirpath, dirnames, _ in os.walk(root):
            d = Path(dirpath)
            if (d / "multirun.yaml").is_file():
                sweeps.append(d)
            if d != root and _is_run_dir(d):
                found.append(d)
                dirnames[:] = []  # members/, wandb/, ... of a run are not runs
            else:
                dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and n != "wandb")
        if not found and len(sweeps) == n_sweeps:  # a sweep folder whose jobs never started is not an error here
            raise TablesError(f"no run directories (folders with .hydra/ or results.json) under '{root}'")
        runs += found
    return sorted(dict.fromkeys(runs), key=_natural), sweeps


def _natural(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The jobs (override lists ``["key=value", ...]``) a Hydra basic-sweeper folder was launched with: the
    product of ``hydra.sweeper.params`` and the command line's values, as the sweeper builds it. None for
    other sweepers (their jobs are not a fixed product)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hcfg = _load_yaml(sweep_dir / "multirun.yaml").get("hydra") or {}
    sweeper = hcfg.get("sweeper") or {}
    if "BasicSweeper" not in str(sweeper.get("_target_", "BasicSweeper")):
        return None
    args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    args += list((hcfg.get("overrides") or {}).get("task") or [])
    overrides = OverridesParser.create().parse_overrides(args)
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def not_started(sweep_dir: Path, run_dirs: list[Path]) -> list[Run]:
    """Jobs of a sweep folder that have no run directory (the sweep stopped before launching them)."""
    jobs = expected_jobs(sweep_dir)
    if not jobs:
        return []
    seen = [set(_load_yaml_list(d / ".hydra" / "overrides.yaml")) for d in run_dirs if d.parent == sweep_dir]
    varying = {o.split("=", 1)[0] for o in set().union(*map(set, jobs)) if sum(o in j for j in jobs) < len(jobs)}
    out = []
    for job in jobs:
        if any(set(job) <= s for s in seen):
            continue
        kv = dict(o.split("=", 1) for o in job if "=" in o)
        desc = " ".join(o for o in job if o.split("=", 1)[0] in varying) or " ".join(job)
        seed = kv.get("seed", "")
        out.append(Run(path=sweep_dir, status=NOT_STARTED, error=f"job never started ({desc})",
                       method=kv.get("method", "?"), model=kv.get("model", "?"), data=kv.get("data", "?"),
                       seed=int(seed) if seed.lstrip("-").isdigit() else None))
    return out


def _load_yaml_list(path: Path) -> list:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(x) for x in data] if isinstance(data, list) else []


def load_runs(paths: Iterable[Path | str]) -> list[Run]:
    """Every run under ``paths`` (complete or not), plus the sweeps' jobs that never started."""
    run_dirs, sweeps = discover([Path(p) for p in paths])
    runs = [read_run(d) for d in run_dirs]
    for s in sweeps:
        try:
            runs += not_started(s, run_dirs)
        except Exception as e:  # an unparsable multirun.yaml must not hide the runs themselves
            runs.append(Run(path=s, status=UNREADABLE, error=f"cannot expand the sweep's jobs ({e})"))
    return runs


def load_wandb(path: str, group: str | None = None) -> list[Run]:
    """Runs of a W&B project ``entity/project`` (optionally one group) as :class:`Run` (metrics from each
    run's summary ``<split>/<metric>``; finished -> complete, failed/crashed -> failed, running -> missing).
    Needs network access and a W&B login; W&B runs carry no predictions, so figures other than the bar
    charts need run directories."""
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
    out = []
    for r in wruns:
        cfg = dict(r.config or {})
        summary = {k: v for k, v in dict(r.summary or {}).items() if isinstance(v, (int, float)) and "/" in k}
        metrics: dict[str, dict] = {}
        for k, v in summary.items():
            split, name = k.split("/", 1)
            if split in ("train", "val", "calib", "test") and "/" not in name:
                metrics.setdefault(split, {})[name] = float(v)
        state = getattr(r, "state", "finished")
        status, error = {"finished": (COMPLETE, ""), "running": (MISSING, "W&B run still running")}.get(
            state, (FAILED, f"W&B run state '{state}'"))
        if status == COMPLETE and not metrics:
            status, error = UNREADABLE, "W&B summary has no <split>/<metric> values"
        mcfg = cfg.get("method") or {}
        out.append(Run(path=None, status=status, error=error + f" [wandb {path}/{r.id}]" if error else "",
                       results={"metrics": metrics, "config": cfg, "wandb": f"{path}/{r.id}"},
                       method=method_label(mcfg.get("name"), mcfg, (cfg.get("hydra_choices") or {}).get("method")),
                       model=str((cfg.get("model") or {}).get("name", "?")),
                       data=str((cfg.get("data") or {}).get("name", "?")), seed=cfg.get("seed")))
    return out


def split_runs(runs: list[Run]) -> tuple[list[Run], list[Run], list[Run]]:
    """(complete runs used in the tables, incomplete runs, duplicates not used: the older run of a cell)."""
    complete = [r for r in runs if r.status == COMPLETE]
    problems = [r for r in runs if r.status != COMPLETE]
    newest: dict[tuple, Run] = {}
    dups = []
    for r in sorted(complete, key=lambda r: r.mtime):
        if r.cell in newest:
            dups.append(newest[r.cell])
        newest[r.cell] = r
    used = [r for r in complete if newest[r.cell] is r]
    return used, problems, dups


def status_lines(runs: list[Run]) -> list[str]:
    """Human-readable lines for every run that is not in the tables (empty when all are complete)."""
    _, problems, dups = split_runs(runs)
    lines = [f"{r.status}: {r.describe()}: {r.error}" for r in problems]
    lines += [f"duplicate (older, not used): {r.describe()}" for r in dups]
    return lines


# --------------------------------------------------------------------------------------------- aggregation
def higher_is_better(metric: str) -> bool | None:
    """True for accuracy / AUROC / AUPRC, False for ECE / NLL / Brier / AURC / FPR@95, None otherwise."""
    if LOWER.search(metric):
        return False
    if HIGHER.search(metric):
        return True
    return None


def observations(runs: list[Run], split: str = "test") -> list[dict]:
    """Long format: one dict per (run, metric) with model, data, row, seed, metric, value. Rows are methods;
    error-detection scores of a run (``errdet_<score>_<m>``) become rows ``<score>`` under metric
    ``errdet_<m>`` (AdUE's table: one row per score)."""
    out = []
    for r in runs:
        m = r.metrics.get(split)
        if not isinstance(m, dict):
            continue
        for key, value in m.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue  # NaN (e.g. misclassification AUROC with no error) leaves the cell: its n shows it
            row, metric, view = r.method, key, "methods"
            hit = re.fullmatch(r"errdet_(.+)_(auroc|auprc|aurc|ece)", key)
            if hit:
                score = hit.group(1)
                row = score if r.method == "adue" else f"{r.method}:{score}"
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


def build_tables(runs: list[Run], split: str = "test", metrics: Iterable[str] | None = None,
                 views: Iterable[str] = VIEWS) -> list[Table]:
    """One table per model x metric: rows = methods (or error-detection scores), columns = datasets."""
    used, _, _ = split_runs(runs)
    obs = observations(used, split)
    views = list(views)
    for v in views:
        if v not in VIEWS:
            raise TablesError(f"unknown view '{v}'; valid choices: {', '.join(VIEWS)}")
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
    models = list(dict.fromkeys(o["model"] for o in obs))
    tables = []
    for view, metric in wanted:
        for model in models:
            sel = [o for o in obs if o["model"] == model and o["metric"] == metric and o["view"] == view]
            if not sel:
                continue
            cols = list(dict.fromkeys(o["data"] for o in sel))
            rows = _ordered(list(dict.fromkeys(o["row"] for o in sel)), SCORE_ORDER if view == "errdet" else METHOD_ORDER)
            cells: dict[tuple[str, str], Cell] = {}
            for o in sel:
                cells.setdefault((o["row"], o["data"]), Cell([])).values.append(o["value"])
            tables.append(Table(model, metric, split, view, rows, cols, cells))
    return tables


def _ordered(items: list[str], order: tuple[str, ...]) -> list[str]:
    rank = {k: i for i, k in enumerate(order)}
    return sorted(items, key=lambda x: (rank.get(x, len(order)), items.index(x)))


# ---------------------------------------------------------------------------------------------- rendering
def _row_name(t: Table, row: str) -> str:
    return SCORE_NAMES.get(row, row) if t.view == "errdet" else METHOD_NAMES.get(row, row)


def _title(t: Table) -> str:
    name = METRIC_NAMES.get(t.metric, t.metric)
    unit = " (%)" if PERCENT.search(t.metric) else ""
    hib = higher_is_better(t.metric)
    arrow = "" if hib is None else (" ↑" if hib else " ↓")
    return f"{name}{unit}{arrow} -- {t.model}, {t.split}"


def _cell_text(t: Table, row: str, col: str, latex: bool) -> str:
    c = t.cells.get((row, col))
    if c is None or c.n == 0:
        return "--" if latex else "–"
    pm = r" \pm " if latex else " ± "
    body = t.fmt(c.mean) + (pm + t.fmt(c.std) if c.n > 1 else "")
    bold = row in t.best(col)
    note = f" (n={c.n})" if c.n < t.n_max else ""
    if latex:
        body = rf"$\mathbf{{{body}}}$" if bold else f"${body}$"
        return body + (rf"\,{{\scriptsize(n={c.n})}}" if note else "")
    return (f"**{body}**" if bold else body) + note


def to_markdown(t: Table) -> str:
    head = ["method" if t.view == "methods" else "score"] + [DATA_NAMES.get(c, c) for c in t.cols]
    lines = [f"### {_title(t)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t.rows:
        lines.append("| " + " | ".join([_row_name(t, r)] + [_cell_text(t, r, c, False) for c in t.cols]) + " |")
    return "\n".join(lines)


def _tex(s: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", s)


def to_latex(t: Table) -> str:
    name = METRIC_NAMES.get(t.metric, t.metric)
    unit = r" (\%)" if PERCENT.search(t.metric) else ""
    hib = higher_is_better(t.metric)
    arrow = "" if hib is None else (r" $\uparrow$" if hib else r" $\downarrow$")
    lines = [
        r"\begin{table}[t]", r"\centering",
        rf"\caption{{{_tex(name)}{unit}{arrow} on {_tex(t.split)}, {_tex(t.model)}: mean $\pm$ std over seeds; "
        r"best per column in bold.}",
        rf"\label{{tab:{_tex(t.key).replace(chr(92), '')}}}",
        r"\begin{tabular}{l" + "c" * len(t.cols) + "}", r"\toprule",
        " & ".join(["Method" if t.view == "methods" else "Score"] + [_tex(DATA_NAMES.get(c, c)) for c in t.cols])
        + r" \\", r"\midrule",
    ]
    for r in t.rows:
        lines.append(" & ".join([_tex(_row_name(t, r))] + [_cell_text(t, r, c, True) for c in t.cols]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def runs_table(runs: list[Run], split: str = "test") -> str:
    """One line per complete run (method, model, data, seed, the main metrics, time)."""
    cols = [("acc", "ACC", True), ("ece", "ECE", True), ("nll", "NLL", False), ("brier", "Brier", False),
            ("aurc", "AURC", False), ("auroc_misclf", "AUROC(err)", False)]
    head = ["method", "model", "data", "seed"] + [c[1] for c in cols] + ["time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    used, _, _ = split_runs(runs)
    for r in sorted(used, key=lambda r: (r.data, r.model, r.method, r.seed if r.seed is not None else -1)):
        m = r.metrics.get(split, {})
        cells = [r.method, r.model, r.data, str(r.seed)]
        for key, _, pct in cols:
            v = m.get(key)
            cells.append("-" if not isinstance(v, (int, float)) else (f"{100 * v:.1f}%" if pct else f"{v:.3f}"))
        total = (r.results.get("timings") or {}).get("total")
        cells.append("-" if total is None else f"{total:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(runs: list[Run], tables: list[Table], split: str = "test") -> str:
    used, problems, dups = split_runs(runs)
    parts = [f"# Results ({split})", "",
             f"{len(used)} complete runs used; {len(problems)} missing / failed; {len(dups)} duplicates not used. "
             "Cells: mean ± std over seeds (n when fewer seeds than the other cells); best per column in bold "
             "(↑ higher is better, ↓ lower is better).", ""]
    for t in tables:
        parts += [to_markdown(t), ""]
    parts += ["## Missing / failed runs", ""]
    lines = status_lines(runs)
    parts += [f"- {ln}" for ln in lines] if lines else ["none"]
    parts += ["", "## Runs", "", runs_table(runs, split), ""]
    return "\n".join(parts)


def summary_rows(tables: list[Table]) -> list[dict]:
    rows = []
    for t in tables:
        for (row, col), c in t.cells.items():
            rows.append({"model": t.model, "split": t.split, "metric": t.metric, "row": row, "data": col,
                         "mean": c.mean, "std": c.std, "n": c.n, "best": row in t.best(col)})
    return rows


# ------------------------------------------------------------------------------------------------ figures
def _predictions(run: Run, split: str) -> dict | None:
    if run.path is None:
        return None
    f = run.path / "predictions" / f"{split}.npz"
    if not f.is_file():
        return None
    with np.load(f) as z:
        return {k: z[k] for k in z.files}


def _groups(runs: list[Run]) -> dict[tuple[str, str], dict[str, list[Run]]]:
    used, _, _ = split_runs(runs)
    out: dict[tuple[str, str], dict[str, list[Run]]] = {}
    for r in used:
        out.setdefault((r.model, r.data), {}).setdefault(r.method, []).append(r)
    return {k: {m: v[m] for m in _ordered(list(v), METHOD_ORDER)} for k, v in out.items()}


def pooled_reliability(runs: list[Run], split: str, n_bins: int = 15) -> dict | None:
    """Reliability bins of the seeds' predictions pooled (counts added, accuracy/confidence count-weighted);
    None when no run has ``predictions/<split>.npz``."""
    from uqlora.metrics import reliability_bins

    acc = conf = count = None
    for r in runs:
        p = _predictions(r, split)
        if p is None:
            continue
        b = reliability_bins(p["probs"], p["labels"], n_bins=n_bins)
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
        correct = p["probs"].argmax(1) == p["labels"]
        scores = {"max_prob": p["probs"].max(1)}
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


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in parts)


def reliability_figure(method_runs: dict[str, list[Run]], split: str, title: str, out_dir: Path, stem: str,
                       n_bins: int = 15) -> list[Path]:
    from matplotlib.figure import Figure

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
        ax.set_title(f"{METHOD_NAMES.get(m, m)}\nECE {100 * b['ece']:.1f}% ({n} seed{'s' * (n != 1)})", fontsize=9)
        ax.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out_dir, stem)


def risk_coverage_figure(method_runs: dict[str, list[Run]], split: str, title: str, out_dir: Path,
                         stem: str) -> list[Path]:
    from matplotlib.figure import Figure

    grid = np.linspace(0.01, 1.0, 100)
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for m, rs in method_runs.items():
        for score, curve in mean_risk_coverage(rs, split, grid).items():
            risks = curve["risk"]
            if score != "max_prob" and m != "adue":
                label = f"{METHOD_NAMES.get(m, m)} ({score})"
            elif m == "adue" and score != "max_prob":
                label = f"AdUE run: {SCORE_NAMES.get(score, score)}"
            else:
                label = METHOD_NAMES.get(m, m)
            mean = risks.mean(0)
            line, = ax.plot(grid, mean, label=f"{label} (AURC {curve['aurc'].mean():.3f})")
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
            ax.bar(x + (i - (len(t.rows) - 1) / 2) * w, means, width=w, yerr=stds, capsize=2,
                   label=_row_name(t, r))
        ax.set_xticks(x, [DATA_NAMES.get(c, c) for c in t.cols])
        ax.set_ylabel(METRIC_NAMES.get(t.metric, t.metric) + (" (%)" if scale == 100 else ""))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=min(5, len(sel[0].rows)), loc="lower left", bbox_to_anchor=(0, 1.02))
    fig.suptitle(f"{model}, {sel[0].split} (mean ± std over seeds)", fontsize=10)
    return _save(fig, out_dir, _slug("bars", model))


def make_figures(runs: list[Run], tables: list[Table], out_dir: Path, split: str = "test",
                 kinds: Iterable[str] = FIGURES) -> tuple[list[Path], list[str]]:
    """Write the figures; returns (paths, notes about runs without saved predictions)."""
    kinds = list(kinds)
    for k in kinds:
        if k not in FIGURES:
            raise TablesError(f"unknown figure '{k}'; valid choices: {', '.join(FIGURES)}")
    out_dir = Path(out_dir)
    paths, notes = [], []
    groups = _groups(runs)
    for (model, data), method_runs in groups.items():
        for m, rs in method_runs.items():
            lacking = [r for r in rs if r.path is not None and not (r.path / "predictions" / f"{split}.npz").is_file()]
            if lacking:
                notes.append(f"no predictions/{split}.npz (figures skip it): "
                             + "; ".join(r.describe() for r in lacking))
        title = f"{DATA_NAMES.get(data, data)} -- {model}, {split}"
        if "reliability" in kinds:
            paths += reliability_figure(method_runs, split, title, out_dir, _slug("reliability", model, data, split))
        if "risk_coverage" in kinds:
            paths += risk_coverage_figure(method_runs, split, title, out_dir,
                                          _slug("risk_coverage", model, data, split))
    if "bars" in kinds:
        for model in dict.fromkeys(t.model for t in tables):
            paths += bar_figure(tables, model, out_dir)
    return paths, notes


# ---------------------------------------------------------------------------------------------------- main
def write_outputs(runs: list[Run], tables: list[Table], out: Path, split: str = "test",
                  figures: Iterable[str] = FIGURES) -> dict:
    """Write tables.md, tables.tex, tex/*.tex, summary.csv and figures/ under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig_paths, notes = make_figures(runs, tables, out / "figures", split, figures) if figures else ([], [])
    md = markdown_report(runs, tables, split)
    if notes:
        md += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out / "tables.md").write_text(md)
    tex_dir = out / "tex"
    tex_dir.mkdir(exist_ok=True)
    texts = []
    for t in tables:
        tex = to_latex(t)
        (tex_dir / f"{_slug(t.model, t.metric, t.split)}.tex").write_text(tex + "\n")
        texts.append(tex)
    (out / "tables.tex").write_text("% needs \\usepackage{booktabs}\n" + "\n\n".join(texts) + "\n")
    rows = summary_rows(tables)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "split", "metric", "row", "data", "mean", "std", "n", "best"])
        w.writeheader()
        w.writerows(rows)
    return {"markdown": out / "tables.md", "latex": out / "tables.tex", "csv": out / "summary.csv",
            "figures": fig_paths, "notes": notes}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like the rest of the project
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _csv_list(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help="run directories or multirun folders")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <first path>/tables)")
    ap.add_argument("--split", default="test", help="the split whose metrics are tabulated (default: test)")
    ap.add_argument("--metrics", default=None, help="comma-separated metric keys (default: the main ones present)")
    ap.add_argument("--views", default=",".join(VIEWS), help=f"comma-separated, of: {', '.join(VIEWS)}")
    ap.add_argument("--figures", default=",".join(FIGURES),
                    help=f"comma-separated, of: {', '.join(FIGURES)}; 'none' for tables only")
    ap.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT", help="read runs from W&B (needs a login)")
    ap.add_argument("--group", default=None, help="W&B group (default: all runs of the project)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any run is missing, failed or duplicated")
    args = ap.parse_args(argv)
    try:
        if not args.paths and not args.wandb:
            raise TablesError("pass run directories / multirun folders, or --wandb <entity>/<project>")
        runs = load_runs(args.paths) if args.paths else []
        if args.wandb:
            runs += load_wandb(args.wandb, args.group)
        if not any(r.status == COMPLETE for r in runs):
            raise TablesError(f"no complete run among {len(runs)} found; " + "; ".join(status_lines(runs)[:3]))
        splits = sorted({s for r in runs for s in r.metrics})
        if args.split not in splits:
            raise TablesError(f"unknown split '{args.split}'; splits in these runs: {', '.join(splits)}")
        figures = [] if args.figures == "none" else _csv_list(args.figures)
        tables = build_tables(runs, args.split, _csv_list(args.metrics), _csv_list(args.views))
        out = args.out or ((args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent) / "tables"
                           if args.paths else Path("tables") / args.wandb.replace("/", "_"))
        written = write_outputs(runs, tables, out, args.split, figures)
    except TablesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    used, problems, dups = split_runs(runs)
    print(f"{len(used)} complete runs -> {len(tables)} tables, {len(written['figures'])} figure files")
    for ln in status_lines(runs):
        print(ln)
    for n in written["notes"]:
        print(n)
    print(f"markdown: {written['markdown']}\nlatex: {written['latex']}\ncsv: {written['csv']}\n"
          f"figures: {out / 'figures'}")
    return 1 if args.strict and (problems or dups) else 0


if __name__ == "__main__":
    sys.exit(main())
