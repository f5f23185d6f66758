"""Paper tables and figures from logged runs: run directories (a multirun folder, several folders) or W&B.

    python experiments/make_tables.py multirun/laplace_lora/<stamp> --out tables/laplace_lora
    python experiments/make_tables.py multirun/a multirun/b --metrics acc,ece,nll --split test
    python experiments/make_tables.py --wandb <entity>/<project> --group laplace_lora --out tables/ll
    make tables RUNS=multirun/laplace_lora/<stamp>        (OUT defaults to <RUNS>/tables)

Runs are grouped by model x dataset x method; every cell is the mean +- sample standard deviation over the
seeds (n shown when a cell has fewer seeds than the others), and the best value of each column (dataset) is
bold: the maximum for accuracy / AUROC / AUPRC, the minimum for ECE / MCE / NLL / Brier / AURC / FPR@95 (ties
at the printed precision are all bold). Methods print under their config's method.display_name; rows follow
the order the sweep listed the methods (the baseline map first, runs outside sweeps after, by label). Runs of
the AdUE method add an error-detection table per metric with one row per uncertainty score (softmax response,
entropy, Mahalanobis, AdUE: `errdet_<score>_<metric>`).

Written to --out: `tables.md` (all tables and the list of missing / failed runs), `tables.tex` (booktabs
tables; one file per table under `tex/` for \\input), `summary.csv` (long format), and `figures/*.pdf|png`:
reliability diagrams pooled over seeds from `predictions/<split>.npz`, risk-coverage curves (mean over seeds),
and accuracy / ECE bar charts with std error bars; and `paired.md`: every method minus MAP (``--vs``) on the same
test examples, per seed, with the test-set standard error and a better / tie / worse verdict, and for runs that
saved error-detection scores (AdUE) each score's ROC-AUC minus the softmax response's on the same predictions.

A run directory is any folder with `.hydra/` or `results.json`. A run counts as complete when its
`results.json` parses and either says `"status": "complete"` or has no status but has `metrics`. Runs without
`results.json` (still running or killed), with a truncated / unparsable one, or with `"status": "failed"` are
listed -- on stdout and in `tables.md` -- never silently dropped; so are the jobs of a sweep folder
(`multirun.yaml`) that never started, and duplicate runs of the same cell (the newest is used). Each run's numeric
precision (`hardware.precision` of its results.json) is in the runs list; a cell whose runs were made in different
precisions is named in `tables.md` and on stdout, and its paired.md rows say so.
`--strict` makes any of these exit with status 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable

from uqlora.errors import UqloraError
from uqlora.results.aggregate import VIEWS, Table, build_tables
from uqlora.results.collect import (COMPLETE, Run, TablesError, load_runs, precision_lines, split_runs,
                                    status_lines)
from uqlora.results.figures import FIGURES, make_figures
from uqlora.results.render import write_tables


def write_outputs(runs: list[Run], tables: list[Table], out: Path, split: str = "test",
                  figures: Iterable[str] = FIGURES) -> dict:
    """Write tables.md, tables.tex, tex/*.tex, summary.csv and figures/ under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig_paths, notes = make_figures(runs, tables, out / "figures", split, figures) if figures else ([], [])
    written = write_tables(runs, tables, out, split, notes)
    return {**written, "figures": fig_paths, "notes": notes}


def _write_paired(runs: list[Run], out: Path, split: str, reference: str) -> Path | None:
    """``paired.md`` (:mod:`uqlora.results.paired`) when some cell has a ``reference`` run and another method, or
    some run saved error-detection scores (each score against the softmax response)."""
    from uqlora.results.names import method_names
    from uqlora.results.paired import errdet_markdown, errdet_rows, paired_markdown, paired_rows

    if reference == "none":
        return None
    rows = paired_rows(runs, split, reference)
    det = errdet_rows(runs, split)
    if not rows and not det:
        return None
    parts = ([paired_markdown(rows, method_names(runs).get(reference, reference), split)] if rows else []) + \
        ([errdet_markdown(det, split=split)] if det else [])
    path = Path(out) / "paired.md"
    path.write_text("\n".join(parts))
    return path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like the rest of the project
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _csv_list(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = _Parser(prog="make_tables.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--vs", default="map", metavar="METHOD",
                    help="paired.md: every method minus this one on the same examples, with the test-set standard "
                         "error (default: map; 'none' to skip)")
    args = ap.parse_args(argv)
    try:
        if not args.paths and not args.wandb:
            raise TablesError("pass run directories / multirun folders, or --wandb <entity>/<project>")
        runs = load_runs(args.paths) if args.paths else []
        if args.wandb:
            from uqlora.results.wandb_runs import load_wandb

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
        paired = _write_paired(runs, out, args.split, args.vs)
    except UqloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    used, problems, dups = split_runs(runs)
    print(f"{len(used)} complete runs -> {len(tables)} tables, {len(written['figures'])} figure files")
    for ln in status_lines(runs) + precision_lines(runs):
        print(ln)
    for n in written["notes"]:
        print(n)
    print(f"markdown: {written['markdown']}\nlatex: {written['latex']}\ncsv: {written['csv']}\n"
          f"figures: {out / 'figures'}")
    if paired:
        print(f"paired differences (methods vs {args.vs}, error-detection scores vs SR): {paired}")
    return 1 if args.strict and (problems or dups) else 0
