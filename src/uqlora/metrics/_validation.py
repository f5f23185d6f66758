"""Input conversion and validation shared by every metric.

All public metrics accept numpy arrays, torch tensors (any device / dtype, including
bfloat16) or nested sequences. They are converted here, once, to numpy arrays (float64 for
probabilities and scores, int64 for labels, bool for correctness) and checked. Every problem
raises :class:`MetricInputError` -- a :class:`ValueError` that is also a
:class:`~uqlora.errors.UqloraError` -- with a one-line message naming the argument and the
problem, e.g. ``"probs has NaN in 3 rows"``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from uqlora.errors import UqloraError

#: Tolerance on ``|sum_c p_c - 1|`` for a row of probabilities (bf16/fp16 softmax outputs
#: cast to float are accepted; logits are not).
ROW_SUM_ATOL = 1e-3


class MetricInputError(UqloraError, ValueError):
    """Metric inputs with a wrong shape, dtype or value, explained in one line."""


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are detached and moved to the CPU)."""
    if x is None:
        raise MetricInputError(f"{name} is None")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # bfloat16 / float16 tensors have no numpy equivalent
        x = x.numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise MetricInputError(f"{name} cannot be converted to an array: {e}") from None
    if arr.dtype == object:
        raise MetricInputError(f"{name} is not a numeric array (ragged or non-numeric values)")
    return arr


def _rows_message(name: str, bad_rows: np.ndarray, what: str) -> str:
    n_bad = int(bad_rows.sum())
    return f"{name} has {what} in {n_bad} row{'s' if n_bad != 1 else ''}"


def _check_prob_matrix(arr: np.ndarray, name: str) -> None:
    """Finite, non-negative, rows summing to 1 (last axis = classes)."""
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise MetricInputError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    flat = arr.reshape(-1, arr.shape[-1]).astype(np.float64, copy=False)
    for bad, what in ((np.isnan(flat), "NaN"), (np.isinf(flat), "inf"), (flat < 0, "negative values")):
        rows = bad.any(axis=1)
        if rows.any():
            raise MetricInputError(_rows_message(name, rows, what))
    sums = flat.sum(axis=1)
    off = np.abs(sums - 1.0) > ROW_SUM_ATOL
    if off.any():
        i = int(np.argmax(off))
        raise MetricInputError(
            f"{name} rows must sum to 1 within {ROW_SUM_ATOL:g}; {int(off.sum())} do not "
            f"(e.g. row {i} sums to {sums[i]:.6g}) -- pass probabilities, not logits")


def check_probs(probs: Any, name: str = "probs") -> np.ndarray:
    """Validate predictive probabilities ``[N, C]`` (N >= 1, C >= 2) and return them as float64."""
    arr = to_numpy(probs, name)
    if arr.ndim != 2:
        raise MetricInputError(f"{name} must be 2-D [N, C], got shape {tuple(arr.shape)}")
    n, c = arr.shape
    if n == 0:
        raise MetricInputError(f"{name} is empty (N=0)")
    if c < 2:
        raise MetricInputError(f"{name} must have at least 2 classes, got shape {tuple(arr.shape)}")
    _check_prob_matrix(arr, name)
    return arr.astype(np.float64, copy=False)


def check_samples(samples: Any, name: str = "samples", n: int | None = None,
                  c: int | None = None) -> np.ndarray:
    """Validate per-sample probabilities ``[S, N, C]`` and return them as float64.

    ``n`` and ``c``, when given, are the expected N and C (those of the matching ``probs``).
    """
    arr = to_numpy(samples, name)
    if arr.ndim != 3:
        raise MetricInputError(f"{name} must be 3-D [S, N, C], got shape {tuple(arr.shape)}")
    s, n_s, c_s = arr.shape
    if s == 0 or n_s == 0:
        raise MetricInputError(f"{name} is empty, shape {tuple(arr.shape)}")
    if c_s < 2:
        raise MetricInputError(f"{name} must have at least 2 classes, got shape {tuple(arr.shape)}")
    if n is not None and n_s != n:
        raise MetricInputError(f"{name} has N={n_s} examples but probs has N={n}")
    if c is not None and c_s != c:
        raise MetricInputError(f"{name} has C={c_s} classes but probs has C={c}")
    _check_prob_matrix(arr, name)
    return arr.astype(np.float64, copy=False)


def check_labels(labels: Any, n: int, n_classes: int, name: str = "labels") -> np.ndarray:
    """Validate integer class labels ``[N]`` in ``[0, n_classes)`` and return them as int64.

    Float arrays are accepted only when every value is integral (e.g. ``3.0``).
    """
    arr = to_numpy(labels, name)
    if arr.ndim != 1:
        raise MetricInputError(f"{name} must be 1-D [N], got shape {tuple(arr.shape)}")
    if arr.shape[0] != n:
        raise MetricInputError(f"{name} has length {arr.shape[0]} but probs has N={n} rows")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise MetricInputError(f"{name} must be integer class indices, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise MetricInputError(f"{name} must be integer class indices, got non-integral values")
    out = arr.astype(np.int64)
    bad = (out < 0) | (out >= n_classes)
    if bad.any():
        raise MetricInputError(
            f"{name} has {int(bad.sum())} value(s) out of range [0, {n_classes}) "
            f"(e.g. {out[bad][0]})")
    return out


def check_scores(scores: Any, name: str, n: int | None = None) -> np.ndarray:
    """Validate a 1-D, non-empty, finite score vector (e.g. confidences) and return float64."""
    arr = to_numpy(scores, name)
    if arr.ndim != 1:
        raise MetricInputError(f"{name} must be 1-D [N], got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise MetricInputError(f"{name} is empty (N=0)")
    if n is not None and arr.shape[0] != n:
        raise MetricInputError(f"{name} has length {arr.shape[0]}, expected {n}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise MetricInputError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        raise MetricInputError(f"{name} has {n_nan} NaN and {n_inf} inf values")
    return arr


def check_correct(correct: Any, n: int, name: str = "correct") -> np.ndarray:
    """Validate a 1-D correctness indicator (bool or 0/1) of length ``n`` and return bool."""
    arr = to_numpy(correct, name)
    if arr.ndim != 1:
        raise MetricInputError(f"{name} must be 1-D [N], got shape {tuple(arr.shape)}")
    if arr.shape[0] != n:
        raise MetricInputError(f"{name} has length {arr.shape[0]} but confidence has length {n}")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.all((arr == 0) | (arr == 1)):
            raise MetricInputError(f"{name} must be boolean or 0/1 values")
    return arr.astype(bool)


def check_n_bins(n_bins: Any) -> int:
    """``n_bins`` must be a positive integer."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise MetricInputError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)
