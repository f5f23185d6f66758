"""Render tables: Markdown (``tables.md``, with the list of missing / failed runs and one line per run),
LaTeX booktabs (``tables.tex`` and one file per table under ``tex/`` for ``\\input``) and ``summary.csv``."""
from __future__ import annotations

import csv
import re
from pathlib import Path

from uqlora.results.aggregate import PERCENT, Table, higher_is_better, summary_rows
from uqlora.results.collect import Run, precision_lines, split_runs, status_lines
from uqlora.results.names import DATA_NAMES, METRIC_NAMES

CSV_FIELDS = ["model", "split", "metric", "row", "data", "mean", "std", "n", "best"]


def slug(*parts: str) -> str:
    """A file-name-safe stem of ``parts`` joined by ``_``."""
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in parts)


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
        lines.append("| " + " | ".join([t.row_name(r)] + [_cell_text(t, r, c, False) for c in t.cols]) + " |")
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
        lines.append(" & ".join([_tex(t.row_name(r))] + [_cell_text(t, r, c, True) for c in t.cols]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


RUN_COLUMNS = [("acc", "ACC", True), ("ece", "ECE", True), ("nll", "NLL", False), ("brier", "Brier", False),
               ("aurc", "AURC", False), ("auroc_misclf", "AUROC(err)", False)]


def runs_table(runs: list[Run], split: str = "test") -> str:
    """One line per complete run (method, model, data, seed, the main metrics, time)."""
    head = ["method", "model", "data", "seed"] + [c[1] for c in RUN_COLUMNS] + ["time (s)", "precision"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    used, _, _ = split_runs(runs)
    for r in sorted(used, key=lambda r: (r.data, r.model, r.method, r.seed if r.seed is not None else -1)):
        m = r.metrics.get(split, {})
        cells = [r.method, r.model, r.data, str(r.seed)]
        for key, _, pct in RUN_COLUMNS:
            v = m.get(key)
            cells.append("-" if not isinstance(v, (int, float)) else (f"{100 * v:.1f}%" if pct else f"{v:.3f}"))
        total = (r.results.get("timings") or {}).get("total")
        cells.append("-" if total is None else f"{total:.0f}")
        cells.append(r.precision or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(runs: list[Run], tables: list[Table], split: str = "test") -> str:
    """``tables.md``: every table, then the runs not in them, then one line per run used."""
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
    mixed = precision_lines(runs)
    if mixed:
        parts += ["", "## Cells of mixed precision", "",
                  "Their paired differences mix the method's effect with the precision's (bf16 vs float32).", ""]
        parts += [f"- {ln}" for ln in mixed]
    parts += ["", "## Runs", "", runs_table(runs, split), ""]
    return "\n".join(parts)


def write_tables(runs: list[Run], tables: list[Table], out: Path, split: str = "test",
                 notes: list[str] = ()) -> dict[str, Path]:
    """Write ``tables.md`` (with ``notes`` appended), ``tables.tex``, ``tex/*.tex`` and ``summary.csv``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown_report(runs, tables, split)
    if notes:
        md += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out / "tables.md").write_text(md)
    tex_dir = out / "tex"
    tex_dir.mkdir(exist_ok=True)
    texts = []
    for t in tables:
        tex = to_latex(t)
        (tex_dir / f"{slug(t.model, t.metric, t.split)}.tex").write_text(tex + "\n")
        texts.append(tex)
    (out / "tables.tex").write_text("% needs \\usepackage{booktabs}\n" + "\n\n".join(texts) + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(summary_rows(tables))
    return {"markdown": out / "tables.md", "latex": out / "tables.tex", "csv": out / "summary.csv"}
