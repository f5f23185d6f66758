r"""Accuracy, proper scoring rules and top-label calibration error.

Notation: ``probs`` is ``p`` with shape ``[N, C]`` (rows sum to 1), ``labels`` is ``y`` with
shape ``[N]``; the prediction is :math:`\hat y_i = \arg\max_c p_{ic}` (ties go to the lowest
class index, as :func:`numpy.argmax`) and the confidence is :math:`\hat p_i = \max_c p_{ic}`.

Binning convention (``reliability_bins``, ``ece``, ``mce``)
-----------------------------------------------------------
``n_bins`` equal-width bins with edges ``numpy.linspace(0, 1, n_bins + 1)``. Bin ``b`` holds the
confidences in the half-open interval ``[edge_b, edge_{b+1})``; the last bin is closed,
``[edge_{n-1}, 1]``. This is the convention that netcal (via :func:`numpy.histogramdd`) and
torchmetrics (``torch.bucketize(..., right=True)``) actually use -- both put a confidence lying
exactly on an interior edge into the *upper* bin, i.e. bins are ``[lo, hi)``, not ``(lo, hi]``.

torchmetrics' ``multiclass_calibration_error`` is not called here, for two reasons, and is
instead used as a test oracle (it agrees to ~1e-7 on data without the case below):

* it casts confidences to float32 (``confidences.float()``), while these metrics are float64;
* a confidence of exactly 1.0 lands in an extra, ``(n_bins+1)``-th bin of its own (bucketize
  index ``n_bins``) instead of the last bin. E.g. confidences (0.95, 1.0) with correctness
  (1, 0) and 15 bins: here (and in netcal) both share the last bin, ECE = |0.5 - 0.975| =
  0.475, MCE = 0.475; torchmetrics gives ECE = 0.5*0.05 + 0.5*1.0 = 0.525, MCE = 1.0.
  Saturated softmax outputs (exactly 1.0 in float32/bf16) make this case common for LLMs.

A confidence of exactly 0 can only occur for invalid probabilities (``max_c p >= 1/C``); it
would go to the first bin in every implementation.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from uqlora.metrics._validation import MetricInputError, check_labels, check_n_bins, check_probs


def _probs_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = check_probs(probs)
    y = check_labels(labels, n=p.shape[0], n_classes=p.shape[1])
    return p, y


def top_label(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    r"""Top-label confidence :math:`\hat p_i = \max_c p_{ic}` and correctness :math:`[\hat y_i = y_i]`.

    Returns ``(confidence [N] float64, correct [N] bool)``.
    """
    p, y = _probs_labels(probs, labels)
    return p.max(axis=1), p.argmax(axis=1) == y


def accuracy(probs: Any, labels: Any) -> float:
    r"""Top-1 accuracy :math:`\frac1N \sum_i [\arg\max_c p_{ic} = y_i]`."""
    _, correct = top_label(probs, labels)
    return float(correct.mean())


def nll(probs: Any, labels: Any, eps: float = 1e-12) -> float:
    r"""Mean negative log-likelihood :math:`-\frac1N \sum_i \log \max(p_{i y_i}, \epsilon)`.

    Probabilities are clamped at ``eps`` so that a zero probability on the true class gives
    :math:`-\log\epsilon` (27.63 for the default) instead of ``inf``.
    """
    p, y = _probs_labels(probs, labels)
    p_true = p[np.arange(p.shape[0]), y]
    return float(-np.mean(np.log(np.maximum(p_true, eps))))


def brier(probs: Any, labels: Any) -> float:
    r"""Multiclass Brier score :math:`\frac1N \sum_i \sum_c (p_{ic} - [y_i = c])^2`, in ``[0, 2]``."""
    p, y = _probs_labels(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def bin_edges(n_bins: int = 15) -> np.ndarray:
    """Equal-width edges ``numpy.linspace(0, 1, n_bins + 1)`` (identical to netcal's)."""
    return np.linspace(0.0, 1.0, check_n_bins(n_bins) + 1)


def bin_indices(confidence: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """Bin index in ``[0, n_bins)`` of each confidence: ``[lo, hi)`` bins, the last one closed.

    Same rule as :func:`numpy.histogram`: ``searchsorted(edges, c, side="right") - 1``, with
    ``c == 1`` (and anything above) moved into the last bin.
    """
    edges = bin_edges(n_bins)
    idx = np.searchsorted(edges, np.asarray(confidence, dtype=np.float64), side="right") - 1
    return np.clip(idx, 0, n_bins - 1)


def _binned(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    n_bins = check_n_bins(n_bins)
    idx = bin_indices(confidence, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, conf_sum / count, np.nan)
        acc = np.where(count > 0, acc_sum / count, np.nan)
    return {"edges": bin_edges(n_bins), "confidence": conf, "accuracy": acc,
            "count": count.astype(np.int64)}


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability statistics over ``n_bins`` equal-width confidence bins.

    Returns a dict of numpy arrays:

    * ``edges`` ``[n_bins + 1]`` -- ``linspace(0, 1, n_bins + 1)``;
    * ``confidence`` ``[n_bins]`` -- mean max-probability of the examples in each bin;
    * ``accuracy`` ``[n_bins]`` -- fraction of those examples predicted correctly;
    * ``count`` ``[n_bins]`` (int64) -- number of examples in each bin.

    ``confidence`` and ``accuracy`` are NaN for empty bins. Bin membership is ``[lo, hi)``,
    with the last bin closed at 1 (see the module docstring).
    """
    conf, correct = top_label(probs, labels)
    return _binned(conf, correct, n_bins)


def confidence_bins(confidence: Any, correct: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """:func:`reliability_bins` from the top-label confidences ``[N]`` and correctness ``[N]`` directly (e.g.
    next-token predictions over a vocabulary, whose ``[N, V]`` probabilities are not kept)."""
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct).reshape(-1)
    if conf.shape != ok.shape or conf.size == 0:
        raise MetricInputError(f"confidence {conf.shape} and correct {ok.shape} must be non-empty and of one length")
    if not np.isfinite(conf).all() or conf.min() < 0 or conf.max() > 1 + 1e-6:
        raise MetricInputError("confidences must be finite values in [0, 1]")
    return _binned(conf, ok.astype(bool), n_bins)


def ece_of_bins(bins: dict[str, np.ndarray]) -> float:
    """ECE from :func:`reliability_bins` / :func:`confidence_bins` output: sum_b n_b / N |acc_b - conf_b|."""
    nonempty = bins["count"] > 0
    weight = bins["count"][nonempty] / bins["count"].sum()
    return float(np.sum(weight * np.abs(bins["accuracy"][nonempty] - bins["confidence"][nonempty])))


def _gaps(probs: Any, labels: Any, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """|acc_b - conf_b| and n_b / N for the non-empty bins."""
    bins = reliability_bins(probs, labels, n_bins)
    nonempty = bins["count"] > 0
    gap = np.abs(bins["accuracy"][nonempty] - bins["confidence"][nonempty])
    weight = bins["count"][nonempty] / bins["count"].sum()
    return gap, weight


def ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    r"""Expected calibration error (top-label, L1): :math:`\sum_b \frac{n_b}{N} |\mathrm{acc}_b - \mathrm{conf}_b|`.

    :math:`\mathrm{acc}_b` and :math:`\mathrm{conf}_b` are the accuracy and mean confidence of
    the :math:`n_b` examples in bin ``b`` (empty bins contribute 0). Equals netcal's
    ``ECE(bins=n_bins)`` and torchmetrics' ``multiclass_calibration_error(norm="l1")`` except
    for confidences of exactly 1.0 (see the module docstring).
    """
    gap, weight = _gaps(probs, labels, n_bins)
    return float(np.sum(weight * gap))


def mce(probs: Any, labels: Any, n_bins: int = 15) -> float:
    r"""Maximum calibration error: :math:`\max_{b:\,n_b>0} |\mathrm{acc}_b - \mathrm{conf}_b|`.

    Same bins as :func:`ece`; equals torchmetrics' ``norm="max"`` except for confidences of
    exactly 1.0 (see the module docstring).
    """
    gap, _ = _gaps(probs, labels, n_bins)
    return float(np.max(gap))
