"""Summarise run directories (a multirun folder, or several run folders) into one table, one line per run.

    python experiments/summarize.py multirun/2026-11-21/12-00-00_ab12cd
    python experiments/summarize.py outputs/2026-11-21/*  --split test --out summary.md

Runs that are missing, failed or unreadable are listed under the table, never silently dropped
(:mod:`uqlora.results`, the package behind experiments/make_tables.py). For the paper's tables (mean +- std
over seeds, best in bold, LaTeX, figures) use experiments/make_tables.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uqlora.results import COMPLETE, TablesError, load_runs, run_from_results, runs_table, split_runs, status_lines


def find_runs(paths: list[Path]) -> tuple[list[dict], list[Path]]:
    """(results.json dicts of the complete runs, run directories that are not complete)."""
    runs = load_runs(paths)
    used, problems, _ = split_runs(runs)
    return [r.results for r in used], [r.path for r in problems]


def table(runs: list[dict], split: str = "test") -> str:
    """The per-run table of ``find_runs``' results dicts (kept for notebooks written against it)."""
    return runs_table([run_from_results(r) for r in runs], split)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table (and the run list) here")
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.paths)
    except TablesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not any(r.status == COMPLETE for r in runs):
        print(f"error: no complete results.json under {', '.join(map(str, args.paths))}", file=sys.stderr)
        for ln in status_lines(runs):
            print(ln, file=sys.stderr)
        return 1
    text = runs_table(runs, args.split)
    problems = status_lines(runs)
    print(text)
    for ln in problems:
        print(ln)
    if args.out:
        extra = "\n\nMissing / failed runs:\n\n" + "\n".join(f"- {ln}" for ln in problems) if problems else ""
        args.out.write_text(text + extra + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
