"""Tables and figures from logged runs, the paper's way: collect run directories (through
:class:`uqlora.rundir.RunDir`) or W&B runs, aggregate mean +- std over seeds, render Markdown / LaTeX / CSV, and
draw reliability, risk-coverage and bar figures. ``experiments/make_tables.py`` is the command line
(:func:`main`); the notebooks call the same functions.

    from uqlora import results
    runs = results.load_runs(["multirun/laplace_lora_cpu/<stamp>"])
    tables = results.build_tables(runs, "test")
    print(results.to_markdown(tables[0]))
    results.write_outputs(runs, tables, "tables/")

Modules: :mod:`~uqlora.results.collect` (runs, statuses, sweep jobs), :mod:`~uqlora.results.names` (display
names and the row order), :mod:`~uqlora.results.aggregate`, :mod:`~uqlora.results.render`,
:mod:`~uqlora.results.figures`, :mod:`~uqlora.results.paired` (each method minus a reference on the same
examples, with the test-set standard error), :mod:`~uqlora.results.wandb_runs`, :mod:`~uqlora.results.cli`.
"""
from uqlora.results.aggregate import (Cell, Table, build_tables, higher_is_better, observations, summary_frame,
                                      summary_rows)
from uqlora.results.cli import main, write_outputs
from uqlora.results.collect import (COMPLETE, FAILED, MISSING, NOT_STARTED, REFUSED, UNREADABLE, Run,
                                    TablesError, discover, expected_jobs, load_runs, not_started, read_run,
                                    precision_lines, run_from_results, split_runs, status_lines)
from uqlora.results.figures import FIGURES, make_figures, mean_risk_coverage, pooled_reliability
from uqlora.results.names import display_name, method_names, method_order
from uqlora.results.paired import paired_markdown, paired_rows
from uqlora.results.render import markdown_report, runs_table, to_latex, to_markdown, write_tables
from uqlora.results.wandb_runs import load_wandb

__all__ = ["COMPLETE", "FAILED", "FIGURES", "MISSING", "NOT_STARTED", "REFUSED", "UNREADABLE", "Cell", "Run",
           "Table", "TablesError", "build_tables", "discover", "display_name", "expected_jobs", "higher_is_better",
           "load_runs", "load_wandb", "main", "make_figures", "markdown_report", "mean_risk_coverage",
           "method_names", "method_order", "not_started", "observations", "paired_markdown", "paired_rows",
           "pooled_reliability", "precision_lines", "read_run",
           "run_from_results", "runs_table", "split_runs", "status_lines", "summary_frame", "summary_rows",
           "to_latex", "to_markdown", "write_outputs", "write_tables"]
