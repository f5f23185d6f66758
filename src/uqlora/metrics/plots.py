"""Reliability diagrams and risk-coverage plots, saved as PNG files.

Figures are built with the object-oriented API (:class:`matplotlib.figure.Figure` drawn by
the Agg canvas), never through ``pyplot``: nothing is displayed, the global backend is left
alone, and no figure is registered with pyplot, so nothing stays open once the function
returns (the figure is freed with its last reference). Files are written atomically: the PNG
goes to a temporary file in the target folder, which then replaces ``path``
(:func:`os.replace`), so a reader never sees a half-written image.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from uqlora.io import atomic_write
from uqlora.metrics._validation import MetricInputError, check_scores
from uqlora.metrics.calibration import reliability_bins

DPI = 120
RELIABILITY_FIGSIZE = (5.0, 6.0)  # inches (width, height) -> 600 x 720 px at 120 dpi
RISK_COVERAGE_FIGSIZE = (6.0, 4.5)  # -> 720 x 540 px


def _save_atomic(fig: Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` as a PNG at ``DPI`` to ``path`` (parents created) via tmp file + os.replace."""
    FigureCanvasAgg(fig)
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    finally:
        fig.clear()


def reliability_diagram(probs: Any, labels: Any, path: str | os.PathLike, n_bins: int = 15,
                        title: str | None = None) -> Path:
    """Top-label reliability diagram with a confidence histogram below; returns ``path``.

    Top panel: per-bin accuracy as bars (empty bins omitted), the gap between each bin's
    accuracy and its mean confidence shaded red, and the diagonal (perfect calibration); ECE
    and accuracy are in the legend. Bottom panel: fraction of examples per bin, with the mean
    confidence and the accuracy as vertical lines. Bins as in
    :func:`uqlora.metrics.calibration.reliability_bins`.
    """
    return plot_reliability(reliability_bins(probs, labels, n_bins), path, title)


def plot_reliability(bins: Mapping[str, np.ndarray], path: str | os.PathLike, title: str | None = None) -> Path:
    """The figure of :func:`reliability_diagram` from precomputed bins (:func:`uqlora.metrics.calibration.
    reliability_bins` or ``confidence_bins``, e.g. of next-token confidences); returns ``path``."""
    edges, count = bins["edges"], bins["count"]
    acc_b, conf_b = bins["accuracy"], bins["confidence"]
    nonempty = count > 0
    weight = count / count.sum()
    ece_value = float(np.sum(weight[nonempty] * np.abs(acc_b[nonempty] - conf_b[nonempty])))
    acc_value = float(np.sum(weight[nonempty] * acc_b[nonempty]))
    mean_conf = float(np.sum(weight[nonempty] * conf_b[nonempty]))
    left, width = edges[:-1][nonempty], np.diff(edges)[nonempty]

    fig = Figure(figsize=RELIABILITY_FIGSIZE, layout="constrained")
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(left, acc_b[nonempty], width=width, align="edge", color="tab:blue",
           edgecolor="black", linewidth=0.6, label="Accuracy")
    low = np.minimum(acc_b[nonempty], conf_b[nonempty])
    gap = np.abs(acc_b[nonempty] - conf_b[nonempty])
    ax.bar(left, gap, bottom=low, width=width, align="edge", color="tab:red", alpha=0.35,
           edgecolor="tab:red", hatch="//", linewidth=0.6, label="Gap to confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    ax.plot([], [], " ", label=f"ECE = {ece_value:.4f}, ACC = {acc_value:.4f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy")
    ax.set_title(title if title is not None else "Reliability diagram")
    ax.legend(loc="upper left", fontsize="small")

    ax_hist.bar(edges[:-1], weight, width=np.diff(edges), align="edge", color="tab:gray",
                edgecolor="black", linewidth=0.6)
    ax_hist.axvline(mean_conf, color="tab:red", linestyle="--", label=f"Mean conf. {mean_conf:.3f}")
    ax_hist.axvline(acc_value, color="tab:blue", linestyle=":", label=f"Accuracy {acc_value:.3f}")
    ax_hist.set_xlabel("Confidence (max probability)")
    ax_hist.set_ylabel("Fraction")
    ax_hist.legend(loc="upper left", fontsize="x-small")
    return _save_atomic(fig, path)


def risk_coverage_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                       path: str | os.PathLike, title: str | None = None) -> Path:
    """Selective risk vs coverage for one or several methods/scores; returns ``path``.

    ``curves`` maps a legend name to ``(coverage, risk)`` as returned by
    :func:`uqlora.metrics.selective.risk_coverage_curve`; the legend shows each curve's AURC
    (the mean of its risks, k = 1..N).
    """
    if not isinstance(curves, Mapping) or not curves:
        raise MetricInputError("curves must be a non-empty dict {name: (coverage, risk)}")
    fig = Figure(figsize=RISK_COVERAGE_FIGSIZE, layout="constrained")
    ax = fig.subplots()
    for name, curve in curves.items():
        if not isinstance(curve, (tuple, list)) or len(curve) != 2:
            raise MetricInputError(f"curves[{name!r}] must be a (coverage, risk) pair")
        coverage = check_scores(curve[0], f"curves[{name!r}] coverage")
        risk = check_scores(curve[1], f"curves[{name!r}] risk", n=coverage.shape[0])
        ax.plot(coverage, risk, label=f"{name} (AURC = {float(np.mean(risk)):.4f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("Coverage")
    ax.set_ylabel("Selective risk (error rate)")
    ax.set_title(title if title is not None else "Risk-coverage curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_atomic(fig, path)
