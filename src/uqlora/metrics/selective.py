r"""Per-example uncertainty scores, selective prediction and misclassification detection.

Scores
------
From probabilities ``p`` ``[N, C]``: :func:`max_prob`, :func:`entropy` (natural log, nats) and
:func:`neg_entropy`. From per-sample predictive probabilities ``p_s`` ``[S, N, C]`` (MC
dropout, ensembles, Laplace samples, ...): :func:`mutual_information`,
:func:`expected_entropy` and :func:`disagreement`. All return float64 arrays ``[N]``;
``0 log 0 = 0`` throughout.

Selective prediction
--------------------
The examples are ranked by a *confidence* (higher = more trusted) and the ``k`` most confident
are accepted. Ranking uses a **stable** sort of ``-confidence``: examples with tied
confidence keep their input order, so the risk-coverage curve (and AURC) inside a run of ties
depends on that order (see ``tests/test_metrics.py::test_aurc_hand_case_with_ties``). Ties
are rare for float32 probabilities but common for saturated or low-precision outputs and for
discrete scores such as :func:`disagreement`.

Misclassification detection
---------------------------
Errors are the positive class and ``-confidence`` is the detector score (a higher score
means "more likely wrong"). AUROC and AUPRC (average precision, sklearn) are undefined when
every prediction is correct or every prediction is wrong: then ``nan`` is returned.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from uqlora.metrics._validation import check_correct, check_probs, check_samples, check_scores


def _entropy_lastaxis(p: np.ndarray) -> np.ndarray:
    """:math:`-\\sum_c p_c \\log p_c` over the last axis, with ``0 log 0 = 0``."""
    return -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=-1)


# ----------------------------------------------------------------------------- scores


def max_prob(probs: Any) -> np.ndarray:
    r"""Maximum softmax probability :math:`\max_c p_{ic}` ``[N]`` (a confidence)."""
    return check_probs(probs).max(axis=1)


def entropy(probs: Any) -> np.ndarray:
    r"""Predictive entropy :math:`H(p_i) = -\sum_c p_{ic} \log p_{ic}` in nats ``[N]`` (an uncertainty)."""
    return _entropy_lastaxis(check_probs(probs))


def neg_entropy(probs: Any) -> np.ndarray:
    r"""Negative predictive entropy :math:`-H(p_i)` ``[N]`` (a confidence)."""
    return -entropy(probs)


def expected_entropy(samples: Any) -> np.ndarray:
    r"""Expected entropy (aleatoric part) :math:`\frac1S \sum_s H(p_{s,i})` ``[N]``."""
    return _entropy_lastaxis(check_samples(samples)).mean(axis=0)


def mutual_information(samples: Any) -> np.ndarray:
    r"""Mutual information (epistemic part, BALD) ``[N]``.

    .. math:: I_i = H\Big(\frac1S \sum_s p_{s,i}\Big) - \frac1S \sum_s H(p_{s,i}) \;\ge 0

    Non-negative by Jensen's inequality; rounding noise below 0 is clipped to 0. Identical
    samples give 0 up to the rounding of the mean (~1e-16).
    """
    p = check_samples(samples)
    mi = _entropy_lastaxis(p.mean(axis=0)) - _entropy_lastaxis(p).mean(axis=0)
    return np.maximum(mi, 0.0)


def disagreement(samples: Any) -> np.ndarray:
    r"""Fraction of samples whose prediction differs from the prediction of the mean ``[N]``.

    .. math:: D_i = \frac1S \sum_s \big[\arg\max_c p_{s,ic} \ne \arg\max_c \bar p_{ic}\big],
              \quad \bar p_i = \frac1S \sum_s p_{s,i}

    A multiple of ``1/S`` in ``[0, 1]``; 0 when every sample predicts the class of the mean.
    Argmax ties go to the lowest class index.
    """
    p = check_samples(samples)
    mean_pred = p.mean(axis=0).argmax(axis=-1)  # [N]
    return (p.argmax(axis=-1) != mean_pred[None, :]).mean(axis=0)


# ----------------------------------------------------------------------------- selective risk


def _confidence_correct(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    conf = check_scores(confidence, "confidence")
    return conf, check_correct(correct, n=conf.shape[0])


def _selective_risks(correct_sorted: np.ndarray) -> np.ndarray:
    """Risk of the k first examples, k = 1..N, given correctness in acceptance order."""
    errors = np.cumsum(~correct_sorted, dtype=np.float64)
    return errors / np.arange(1, correct_sorted.shape[0] + 1)


def risk_coverage_curve(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    r"""Risk-coverage curve ``(coverage [N], risk [N])``.

    Examples are sorted by decreasing confidence (stable sort: ties keep their input order).
    For :math:`k = 1, \dots, N`: coverage :math:`k/N` and selective risk
    :math:`r_k = \frac1k \sum_{j \le k} [\text{example } (j) \text{ is wrong}]`.
    """
    conf, corr = _confidence_correct(confidence, correct)
    order = np.argsort(-conf, kind="stable")
    n = conf.shape[0]
    return np.arange(1, n + 1) / n, _selective_risks(corr[order])


def aurc(confidence: Any, correct: Any) -> float:
    r"""Area under the risk-coverage curve, :math:`\mathrm{AURC} = \frac1N \sum_{k=1}^N r_k`.

    The discrete definition of Geifman et al. (2019), "Bias-reduced uncertainty estimation
    for deep neural classifiers"; lower is better.
    """
    _, risk = risk_coverage_curve(confidence, correct)
    return float(np.mean(risk))


def eaurc(confidence: Any, correct: Any) -> float:
    r"""Excess AURC: :math:`\mathrm{AURC} - \mathrm{AURC}^*`.

    :math:`\mathrm{AURC}^*` is the AURC of the oracle ranking that accepts every correct
    prediction before any wrong one (same accuracy):
    :math:`\frac1N \sum_{k} \max(0, k - N_\text{correct}) / k`. Non-negative; 0 for a
    perfect ranking.
    """
    conf, corr = _confidence_correct(confidence, correct)
    oracle = float(np.mean(_selective_risks(np.sort(corr)[::-1])))
    return aurc(conf, corr) - oracle


# ----------------------------------------------------------------------------- error detection


def _error_detection(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray] | None:
    conf, corr = _confidence_correct(confidence, correct)
    errors = ~corr
    if errors.all() or not errors.any():
        return None
    return errors.astype(np.int64), -conf


def misclassification_auroc(confidence: Any, correct: Any) -> float:
    r"""AUROC of detecting errors (positives) with score ``-confidence``.

    :math:`P(c_\text{error} < c_\text{correct}) + \frac12 P(c_\text{error} = c_\text{correct})`;
    0.5 is chance, 1.0 means every error is less confident than every correct prediction.
    ``nan`` when all predictions are correct or all are wrong.
    """
    from sklearn.metrics import roc_auc_score

    data = _error_detection(confidence, correct)
    return float("nan") if data is None else float(roc_auc_score(*data))


def misclassification_auprc(confidence: Any, correct: Any) -> float:
    """Average precision (sklearn) of detecting errors (positives) with score ``-confidence``.

    Chance level is the error rate. ``nan`` when all predictions are correct or all wrong.
    """
    from sklearn.metrics import average_precision_score

    data = _error_detection(confidence, correct)
    return float("nan") if data is None else float(average_precision_score(*data))
