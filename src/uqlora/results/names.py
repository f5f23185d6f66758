"""What tables print for methods, uncertainty scores, datasets and metrics, and the order of the method rows.

A method's row is keyed by its label (:meth:`uqlora.rundir.RunDir.method_label`: the Hydra option, e.g.
``laplace_ll``) and printed under its display name: ``method.display_name`` of the run's config (each method's
schema sets it; an option's yaml may override it, e.g. ``LLLA`` for ``laplace_ll``). Runs recorded before
configs had that field fall back to :data:`LEGACY_NAMES`, else to the label itself. A new method therefore
needs no edit here.

Row order (:func:`method_order`):

1. methods whose class is ``map`` (the LoRA baseline and its variants) first;
2. then the methods of sweep folders in the order the sweep listed them: a method's place is the smallest job
   number among its runs (``hydra.job.num``; a job that never started counts with its place in the sweep), the
   sweep folders taken in the order they were found (the paths as given, then depth-first by name);
3. then methods seen only in runs outside any sweep folder, by label.

Ties inside 1 follow the same rule. Uncertainty-score rows of the error-detection tables (AdUE's scores) keep
the fixed order of :data:`SCORE_ORDER`, unknown scores after it in order of appearance.
"""
from __future__ import annotations

from typing import Iterable

# runs recorded before configs carried method.display_name
LEGACY_NAMES = {
    "map": "MAP", "temperature": "Temperature", "mc_dropout": "MC dropout", "ensemble": "Ensemble",
    "swag": "SWAG", "multiswag": "MultiSWAG", "swag_lora": "SWAG", "multiswag_lora": "MultiSWAG",
    "laplace_ll": "LLLA", "laplace": "Laplace-LoRA", "ual": "UAL", "adue": "AdUE",
}
SCORE_NAMES = {"sr": "SR", "entropy": "Entropy", "mahalanobis": "Mahalanobis", "adue": "AdUE"}
SCORE_ORDER = ("sr", "entropy", "mahalanobis", "adue")
DATA_NAMES = {
    "wg_s": "WG-S", "wg_m": "WG-M", "arc_c": "ARC-C", "arc_e": "ARC-E", "obqa": "OBQA", "boolq": "BoolQ",
    "cqa": "CQA", "mmlu": "MMLU", "sst2": "SST-2", "sst5": "SST-5", "cola": "CoLA", "agnews": "AG News",
    "20ng": "20NG", "tweeteval_hate": "TweetEval-hate", "tweeteval_offensive": "TweetEval-offensive",
}
METRIC_NAMES = {
    "acc": "ACC", "mean_confidence": "mean confidence", "ece": "ECE", "mce": "MCE", "nll": "NLL", "brier": "Brier", "aurc": "AURC", "eaurc": "E-AURC",
    "auroc_misclf": "AUROC (misclassification)", "auprc_misclf": "AUPRC (misclassification)",
    "errdet_auroc": "error-detection ROC-AUC", "errdet_auprc": "error-detection AUPRC",
    "errdet_aurc": "error-detection AURC", "errdet_ece": "ECE of u as P(error)",
    "gsm8k_acc": "GSM8K exact match", "rouge_l": "ROUGE-L", "silhouette_source": "silhouette by source",
}
BASELINE = "map"  # the method class whose rows come first


def display_name(label: str, explicit: str | None = None) -> str:
    """The printed name of a method: ``explicit`` (a config's ``display_name``), else the legacy name, else
    the label."""
    return str(explicit) if explicit else LEGACY_NAMES.get(label, label)


def method_names(runs: Iterable) -> dict[str, str]:
    """``{label: display name}`` of ``runs``: the first ``display_name`` recorded in a run's config, else the
    fallback of :func:`display_name`. Labels that would print alike (``swag`` and ``swag_lora`` both as SWAG)
    get their label added: ``SWAG (swag_lora)``."""
    explicit: dict[str, str] = {}
    labels = []
    for r in runs:
        labels.append(r.method)
        if r.display and r.method not in explicit:
            explicit[r.method] = r.display
    names = {m: display_name(m, explicit.get(m)) for m in dict.fromkeys(labels)}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {m: f"{n} ({m})" if n in clash else n for m, n in names.items()}


def _place(run) -> tuple:
    first = 0 if run.base == BASELINE else 1
    if run.sweep is None:
        return (first, 1, 0, 0.0, run.method)
    return (first, 0, run.sweep, float("inf") if run.job is None else float(run.job), "")


def method_order(runs: Iterable) -> list[str]:
    """The method labels of ``runs`` (complete or not) in row order: the rule in this module's docstring."""
    place: dict[str, tuple] = {}
    for r in runs:
        place[r.method] = min(place.get(r.method, _place(r)), _place(r))
    return sorted(place, key=lambda m: (place[m], m))


def score_order(rows: list[str]) -> list[str]:
    rank = {k: i for i, k in enumerate(SCORE_ORDER)}
    return sorted(rows, key=lambda x: (rank.get(x, len(SCORE_ORDER)), rows.index(x)))
