"""Collect runs: the run directories and sweep folders under some paths, each read through
:class:`uqlora.rundir.RunDir`, plus the jobs of a sweep folder that never started.

A run directory is any folder with ``.hydra/`` or ``results.json``. Its status is
:meth:`RunDir.status_detail` (complete / failed / refused / missing / unreadable); a sweep folder
(``multirun.yaml``) adds a ``not started`` entry for every job of its basic-sweeper product without a run
directory. Nothing is dropped silently: :func:`status_lines` lists every run that is not in the tables, and the
older run of a duplicated cell (same model, data, method, seed).
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from uqlora.errors import UqloraError
import yaml

from uqlora.rundir import COMPLETE, FAILED, MISSING, REFUSED, UNREADABLE, RunDir, label_of

NOT_STARTED = "not started"
__all__ = ["COMPLETE", "FAILED", "MISSING", "NOT_STARTED", "REFUSED", "UNREADABLE", "Run", "TablesError",
           "discover", "expected_jobs", "load_runs", "not_started", "read_run", "run_from_results", "split_runs",
           "precision_lines", "status_lines"]


class TablesError(UqloraError):
    """Bad input to the table maker: printed as one line ``error: ...``."""


@dataclass
class Run:
    """One run (or one job that never started) as the tables see it."""

    path: Path | None
    status: str
    method: str = "?"            # the row label (RunDir.method_label: the Hydra option, e.g. laplace_ll)
    model: str = "?"
    data: str = "?"
    seed: int | None = None
    error: str = ""
    results: dict = field(default_factory=dict)
    mtime: float = 0.0
    display: str = ""            # method.display_name recorded in the run's config ("" for older runs)
    base: str = "?"              # the method class (method.name)
    sweep: int | None = None     # index of the sweep folder holding the run (row order), None outside sweeps
    job: int | None = None       # its job number in that sweep

    @property
    def metrics(self) -> dict:
        return self.results.get("metrics") or {}

    @property
    def cell(self) -> tuple:
        return (self.model, self.data, self.method, self.seed)

    @property
    def precision(self) -> str:
        """The numeric precision the run trained and predicted in: ``hardware.precision`` of its results.json
        (runs since model.precision=auto), else its config's ``model.precision`` unless that says auto; "" when
        unknown."""
        hw = self.results.get("hardware")
        if isinstance(hw, dict) and hw.get("precision"):
            return str(hw["precision"])
        model = (self.results.get("config") or {}).get("model")
        prec = str(model.get("precision") or "") if isinstance(model, dict) else ""
        return "" if prec == "auto" else prec

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.method} / {self.model} / {self.data} / seed {self.seed}{where}"


def _int(v) -> int | None:
    return None if v is None else int(v)


def run_from_results(res: dict, path: Path | None = None, status: str = COMPLETE, error: str = "",
                     cfg: dict | None = None, label: str | None = None) -> Run:
    """A :class:`Run` from a ``results.json`` dict (its ``config``, else ``cfg``, names the method, model,
    data); ``label``: the row label when known (a run directory's :meth:`RunDir.method_label`)."""
    rcfg = res.get("config") if isinstance(res.get("config"), dict) else (cfg or {})
    mcfg = rcfg.get("method") if isinstance(rcfg.get("method"), dict) else {}
    seed = res.get("seed", rcfg.get("seed"))
    return Run(path=path, status=status, error=error, results=res,
               method=label or label_of(res.get("method") or mcfg.get("name"), mcfg, None, res.get("method_label")),
               model=str(res.get("model") or (rcfg.get("model") or {}).get("name") or "?"),
               data=str(res.get("data") or (rcfg.get("data") or {}).get("name") or "?"),
               seed=_int(seed), display=str(mcfg.get("display_name") or ""),
               base=str(res.get("method") or mcfg.get("name") or "?"))


def read_run(run_dir: Path | RunDir) -> Run:
    """One run directory -> :class:`Run` with its status (complete / failed / refused / missing / unreadable)."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    status, error = rd.status_detail()
    run = run_from_results(rd.results() or {}, rd.path, status, error, rd.config_dict(), rd.method_label())
    run.mtime = rd.results_path.stat().st_mtime if rd.results_path.is_file() else 0.0
    run.job = rd.job_num()
    return run


def discover(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """Run directories and sweep folders (with ``multirun.yaml``) under ``paths``."""
    runs, sweeps = [], []
    for root in map(Path, paths):
        if not root.exists():
            raise TablesError(f"'{root}' does not exist; pass a run directory or a multirun folder")
        if RunDir(root).is_run():
            runs.append(root)
            continue
        found, n_sweeps = [], len(sweeps)
        for dirpath, dirnames, _ in os.walk(root):
            d = Path(dirpath)
            if (d / "multirun.yaml").is_file():
                sweeps.append(d)
            if d != root and RunDir(d).is_run():
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
    """The jobs (override lists ``["key=value", ...]``) a Hydra basic-sweeper folder was launched with, in
    launch order; None for other sweepers (their jobs are not a fixed product).

    As Hydra's basic sweeper builds them: ``hydra.sweeper.params`` then the command line's task overrides,
    one entry per key (a key given again keeps its first place and takes the later values), and the cartesian
    product of the entries' values with the last key varying fastest."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        cfg = yaml.safe_load((Path(sweep_dir) / "multirun.yaml").read_text())
    except (OSError, yaml.YAMLError):
        cfg = None
    hcfg = (cfg.get("hydra") if isinstance(cfg, dict) else None) or {}
    sweeper = hcfg.get("sweeper") or {}
    if "BasicSweeper" not in str(sweeper.get("_target_", "BasicSweeper")):
        return None
    args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    args += [str(a) for a in (hcfg.get("overrides") or {}).get("task") or []]
    axes: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(args):
        key = o.get_key_element()
        if not o.is_sweep_override():
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            raise TablesError(f"sweep override '{o.input_line}' is not a list or a range; the basic sweeper "
                              "expands only those")
    return [list(job) for job in itertools.product(*axes.values())]


def _job_identity(overrides: Iterable[str]) -> set[str]:
    """The overrides that say which run a job is: a sweep relaunched with `resume=true` (its multirun.yaml then
    records it) expects the jobs of the first launch, whose run folders do not carry it, so the keys that do not
    change what a run computes (`uqlora.runs.PRESENTATION`, as skip_complete compares configs) are left out."""
    from uqlora.runs import PRESENTATION

    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    return {o for o in overrides if not any(key(o) == p or key(o).startswith(p + ".") for p in PRESENTATION)}


def not_started(sweep_dir: Path, run_dirs: list[Path]) -> list[Run]:
    """Jobs of a sweep folder that have no run directory (the sweep stopped before launching them)."""
    jobs = expected_jobs(sweep_dir)
    if not jobs:
        return []
    seen = [_job_identity(RunDir(d).overrides()) for d in run_dirs if d.parent == Path(sweep_dir)]
    varying = {o.split("=", 1)[0] for o in set().union(*map(set, jobs)) if sum(o in j for j in jobs) < len(jobs)}
    out = []
    for num, job in enumerate(jobs):
        if any(_job_identity(job) <= s for s in seen):
            continue
        kv = dict(o.split("=", 1) for o in job if "=" in o)
        desc = " ".join(o for o in job if o.split("=", 1)[0] in varying) or " ".join(job)
        seed = kv.get("seed", "")
        out.append(Run(path=Path(sweep_dir), status=NOT_STARTED, error=f"job never started ({desc})",
                       method=kv.get("method", "?"), model=kv.get("model", "?"), data=kv.get("data", "?"),
                       seed=int(seed) if seed.lstrip("-").isdigit() else None, job=num))
    return out


def load_runs(paths: Iterable[Path | str]) -> list[Run]:
    """Every run under ``paths`` (complete or not), plus the sweeps' jobs that never started. Each run inside
    a sweep folder records the folder's index (``Run.sweep``: the sweeps in the order found) for the row order."""
    run_dirs, sweeps = discover([Path(p) for p in paths])
    runs = [read_run(d) for d in run_dirs]
    for s in sweeps:
        try:
            runs += not_started(s, run_dirs)
        except Exception as e:  # an unparsable multirun.yaml must not hide the runs themselves
            runs.append(Run(path=s, status=UNREADABLE, error=f"cannot expand the sweep's jobs ({e})"))
    index = {s: i for i, s in enumerate(sweeps)}
    for r in runs:
        if r.path is None:
            continue
        sweep = r.path if r.status == NOT_STARTED else r.path.parent
        if sweep not in index and (sweep / "multirun.yaml").is_file():
            index[sweep] = len(index)  # a run directory of a sweep passed on its own
        r.sweep = index.get(sweep)
    return runs


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


def precision_lines(runs: list[Run]) -> list[str]:
    """One line per cell (model, dataset, seed) whose runs in the tables were made in different numeric precisions
    (e.g. a bf16 MAP beside a float32 BLoB run on a CPU without bf16): their paired differences then mix the
    methods' effect with the precision's. Empty when every cell is of one precision (or it is unknown)."""
    used, _, _ = split_runs(runs)
    cells: dict[tuple, dict[str, list[str]]] = {}
    for r in used:
        if r.precision:
            cells.setdefault((r.model, r.data, r.seed), {}).setdefault(r.precision, []).append(r.method)
    lines = []
    for (model, data, seed), by_prec in sorted(cells.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if len(by_prec) > 1:
            parts = "; ".join(f"{p}: {', '.join(sorted(ms))}" for p, ms in sorted(by_prec.items()))
            lines.append(f"mixed precision in {model} / {data} / seed {seed}: {parts}")
    return lines
