r"""Out-of-distribution detection metrics from a confidence score.

The score is a *confidence*: higher means "more in-distribution" (e.g. max probability,
negative entropy). In-distribution examples are the positive class.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from uqlora.metrics._validation import MetricInputError, check_scores


def fpr_at_tpr(score_in: Any, score_out: Any, tpr: float = 0.95) -> float:
    r"""Fraction of OOD examples accepted when a fraction ``tpr`` of in-distribution ones is.

    An example is accepted when its score is ``>= t``. The threshold ``t`` is the largest
    one accepting at least ``tpr`` of the in-distribution examples: the
    :math:`k`-th largest in-distribution score with :math:`k = \lceil \mathrm{tpr} \cdot N_\text{in} \rceil`.
    All examples tied at ``t`` are accepted (in and out alike), so the actual TPR can exceed
    ``tpr``. This is the usual "first point of the ROC curve with TPR >= 0.95" definition.

    .. math:: \mathrm{FPR}@\mathrm{tpr} = \frac{1}{N_\text{out}} \sum_j [s^\text{out}_j \ge t]
    """
    s_in = check_scores(score_in, "score_in")
    s_out = check_scores(score_out, "score_out")
    if not 0.0 < tpr <= 1.0:
        raise MetricInputError(f"tpr must be in (0, 1], got {tpr}")
    # 1e-9 guards against tpr * n landing a rounding error above an integer (0.95 * 20).
    k = max(1, math.ceil(tpr * s_in.shape[0] - 1e-9))
    threshold = np.sort(s_in)[::-1][k - 1]
    return float(np.mean(s_out >= threshold))


def ood_metrics(score_in: Any, score_out: Any) -> dict[str, float]:
    """OOD detection metrics from confidences of in-distribution and OOD examples.

    Returns a dict of floats:

    * ``auroc`` -- ROC AUC of separating in (positive) from out, scored by confidence;
      0.5 is chance, 1.0 perfect separation;
    * ``aupr_in`` -- average precision with in-distribution as positive, scored by confidence;
    * ``aupr_out`` -- average precision with OOD as positive, scored by ``-confidence``;
    * ``fpr95`` -- :func:`fpr_at_tpr` at 95% TPR (lower is better).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    s_in = check_scores(score_in, "score_in")
    s_out = check_scores(score_out, "score_out")
    y = np.concatenate([np.ones(s_in.shape[0], np.int64), np.zeros(s_out.shape[0], np.int64)])
    s = np.concatenate([s_in, s_out])
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "fpr95": fpr_at_tpr(s_in, s_out, 0.95),
    }
