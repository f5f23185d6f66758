"""Summarise run directories (a multirun folder, or several run folders) into one table.

    python experiments/summarize.py multirun/2026-11-21/12-00-00_ab12cd
    python experiments/summarize.py outputs/2026-11-21/*  --split test --out summary.md

Runs without a complete results.json are listed as missing, never silently dropped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = [("acc", "ACC", True), ("ece", "ECE", True), ("nll", "NLL", False), ("brier", "Brier", False),
           ("aurc", "AURC", False), ("auroc_misclf", "AUROC(err)", False)]


def find_runs(paths: list[Path]) -> tuple[list[dict], list[Path]]:
    runs, missing = [], []
    for root in paths:
        candidates = [root] if (root / ".hydra").is_dir() else sorted(p.parent for p in root.glob("*/.hydra"))
        for d in candidates:
            try:
                runs.append(json.loads((d / "results.json").read_text()))
            except (OSError, json.JSONDecodeError):
                missing.append(d)
    return runs, missing


def table(runs: list[dict], split: str = "test") -> str:
    head = ["method", "model", "data", "seed"] + [c[1] for c in COLUMNS] + ["time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(runs, key=lambda r: (r["data"], r["model"], r["method"], r["seed"])):
        m = r["metrics"].get(split, {})
        cells = [r["method"], r["model"], r["data"], str(r["seed"])]
        for key, _, pct in COLUMNS:
            v = m.get(key)
            cells.append("-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}"))
        cells.append(f"{r['timings'].get('total', float('nan')):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    runs, missing = find_runs(args.paths)
    if not runs:
        print(f"error: no results.json under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1
    text = table(runs, args.split)
    print(text)
    for d in missing:
        print(f"missing or incomplete run: {d}")
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
