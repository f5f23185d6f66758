"""One-call evaluation of a method's predictions, returning flat JSON-serialisable dicts.

Both functions validate their inputs first (see :mod:`uqlora.metrics._validation`): ``probs``
2-D ``[N, C]``, finite, non-negative, rows summing to 1 within 1e-3; ``labels`` 1-D integers in
``[0, C)`` of length N; ``samples`` ``[S, N, C]`` with the same N and C. A violation raises
:class:`~uqlora.metrics._validation.MetricInputError` (a ``ValueError``) with a one-line
message such as ``"probs has NaN in 3 rows"``.

Values are Python floats (``n`` included). Misclassification AUROC/AUPRC are ``nan`` when all
predictions are correct or all are wrong (``json.dumps`` writes ``NaN``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from uqlora.metrics import calibration as cal
from uqlora.metrics import selective as sel
from uqlora.metrics._validation import MetricInputError, check_labels, check_probs, check_samples
from uqlora.metrics.ood import ood_metrics

#: Keys always returned by :func:`evaluate_predictions`.
PREDICTION_KEYS = (
    "n", "acc", "nll", "brier", "ece", "mce", "mean_confidence",
    "aurc", "eaurc", "auroc_misclf", "auprc_misclf", "auroc_misclf_entropy", "aurc_entropy",
)
#: Extra keys returned by :func:`evaluate_predictions` when ``samples`` is given.
SAMPLE_KEYS = ("mutual_information_mean", "expected_entropy_mean", "disagreement_mean")

#: OOD confidence scores of :func:`evaluate_ood`; the sample-based ones need samples.
OOD_SCORES = ("max_prob", "neg_entropy")
OOD_SAMPLE_SCORES = ("neg_mutual_information", "neg_expected_entropy", "neg_disagreement")
OOD_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")


def evaluate_predictions(probs: Any, labels: Any, n_bins: int = 15,
                         samples: Any = None) -> dict[str, float]:
    """Accuracy, calibration, selective-prediction and uncertainty summaries.

    Keys (all floats):

    * ``n`` -- number of examples; ``acc``; ``nll``; ``brier`` (multiclass, in [0, 2]);
    * ``ece``, ``mce`` -- top-label, ``n_bins`` equal-width bins (:mod:`.calibration`);
    * ``mean_confidence`` -- mean max probability (compare with ``acc``);
    * ``aurc``, ``eaurc``, ``auroc_misclf``, ``auprc_misclf`` -- confidence = max probability;
    * ``aurc_entropy``, ``auroc_misclf_entropy`` -- confidence = negative entropy;
    * with ``samples`` ``[S, N, C]``: ``mutual_information_mean``, ``expected_entropy_mean``,
      ``disagreement_mean`` -- means over the N examples of the per-example scores of
      :mod:`.selective`.
    """
    p = check_probs(probs)
    y = check_labels(labels, n=p.shape[0], n_classes=p.shape[1])
    s = None if samples is None else check_samples(samples, n=p.shape[0], c=p.shape[1])

    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    neg_ent = sel.neg_entropy(p)
    out = {
        "n": float(p.shape[0]),
        "acc": float(correct.mean()),
        "nll": cal.nll(p, y),
        "brier": cal.brier(p, y),
        "ece": cal.ece(p, y, n_bins),
        "mce": cal.mce(p, y, n_bins),
        "mean_confidence": float(conf.mean()),
        "aurc": sel.aurc(conf, correct),
        "eaurc": sel.eaurc(conf, correct),
        "auroc_misclf": sel.misclassification_auroc(conf, correct),
        "auprc_misclf": sel.misclassification_auprc(conf, correct),
        "aurc_entropy": sel.aurc(neg_ent, correct),
        "auroc_misclf_entropy": sel.misclassification_auroc(neg_ent, correct),
    }
    if s is not None:
        out["mutual_information_mean"] = float(sel.mutual_information(s).mean())
        out["expected_entropy_mean"] = float(sel.expected_entropy(s).mean())
        out["disagreement_mean"] = float(sel.disagreement(s).mean())
    return out


#: Keys per score of :func:`evaluate_error_detection` (``errdet_{score}_{metric}``).
ERROR_DETECTION_METRICS = ("auroc", "auprc", "aurc", "ece")


def evaluate_error_detection(uncertainty: dict[str, Any], correct: Any, n_bins: int = 15,
                             probability_scores: tuple[str, ...] = (),
                             error_probabilities: dict[str, Any] | None = None) -> dict[str, float]:
    """Misclassification detection by per-example uncertainty scores (higher = more likely wrong).

    For every ``name -> u [N]``: ``errdet_{name}_auroc`` (ROC-AUC of detecting the errors; AdUE's
    primary metric), ``_auprc`` (average precision, errors positive), ``_aurc`` (area under the
    risk-coverage curve when accepting the least uncertain first); and for the scores named in
    ``probability_scores`` ``_ece``: the equal-width binned ``sum_b |B_b|/N |mean(q in b) - error rate in b|``
    with ``n_bins`` bins of the score's probability of error q in [0, 1] -- ``error_probabilities[name]``
    when given (a score rescaled for ranking is not one: the softmax response ``(1 - max p) / (1 - 1/C)``
    ranks as SR, but its probability of error is ``1 - max p``), else u itself (e.g. AdUE's u, trained as
    one). AUROC/AUPRC are ``nan`` when all predictions are right or all wrong.
    """
    corr = np.asarray(correct).astype(bool).reshape(-1)
    out: dict[str, float] = {}
    for name, u in uncertainty.items():
        u = np.asarray(u, dtype=np.float64).reshape(-1)
        if u.shape != corr.shape:
            raise MetricInputError(f"uncertainty '{name}' has {u.shape[0]} values for {corr.shape[0]} examples")
        if not np.isfinite(u).all():
            raise MetricInputError(f"uncertainty '{name}' has {int((~np.isfinite(u)).sum())} non-finite values")
        out[f"errdet_{name}_auroc"] = sel.misclassification_auroc(-u, corr)
        out[f"errdet_{name}_auprc"] = sel.misclassification_auprc(-u, corr)
        out[f"errdet_{name}_aurc"] = sel.aurc(-u, corr)
        if name in probability_scores:
            q = u if name not in (error_probabilities or {}) else np.asarray(error_probabilities[name],
                                                                              dtype=np.float64).reshape(-1)
            if q.shape != corr.shape or not np.isfinite(q).all() or q.min() < 0 or q.max() > 1:
                raise MetricInputError(f"the probability of error of '{name}' must be {corr.shape[0]} finite "
                                       "values in [0, 1]")
            idx = cal.bin_indices(q, n_bins)
            err = (~corr).astype(np.float64)
            gap = 0.0
            for b in range(n_bins):
                m = idx == b
                if m.any():
                    gap += m.sum() / q.shape[0] * abs(q[m].mean() - err[m].mean())
            out[f"errdet_{name}_ece"] = float(gap)
    return out


def _ood_scores(p: np.ndarray, s: np.ndarray | None) -> dict[str, np.ndarray]:
    scores = {"max_prob": p.max(axis=1), "neg_entropy": sel.neg_entropy(p)}
    if s is not None:
        scores["neg_mutual_information"] = -sel.mutual_information(s)
        scores["neg_expected_entropy"] = -sel.expected_entropy(s)
        scores["neg_disagreement"] = -sel.disagreement(s)
    return scores


def evaluate_ood(probs_in: Any, probs_out: Any, samples_in: Any = None,
                 samples_out: Any = None) -> dict[str, float]:
    """OOD detection metrics for several confidence scores (higher = more in-distribution).

    Keys are ``ood_{score}_{metric}`` with ``metric`` in ``auroc``, ``aupr_in``, ``aupr_out``,
    ``fpr95`` (see :func:`uqlora.metrics.ood.ood_metrics`) and ``score`` in

    * ``max_prob`` -- max probability of ``probs``;
    * ``neg_entropy`` -- negative predictive entropy of ``probs``;
    * with samples (both ``samples_in`` and ``samples_out``): ``neg_mutual_information``,
      ``neg_expected_entropy``, ``neg_disagreement`` -- negated per-example scores of
      :mod:`.selective` computed from the samples.

    In- and out-of-distribution inputs must have the same number of classes C.
    """
    p_in = check_probs(probs_in, "probs_in")
    p_out = check_probs(probs_out, "probs_out")
    if p_in.shape[1] != p_out.shape[1]:
        raise MetricInputError(
            f"probs_in has C={p_in.shape[1]} classes but probs_out has C={p_out.shape[1]}")
    if (samples_in is None) != (samples_out is None):
        raise MetricInputError("pass both samples_in and samples_out, or neither")
    s_in = s_out = None
    if samples_in is not None:
        s_in = check_samples(samples_in, "samples_in", n=p_in.shape[0], c=p_in.shape[1])
        s_out = check_samples(samples_out, "samples_out", n=p_out.shape[0], c=p_out.shape[1])

    scores_in, scores_out = _ood_scores(p_in, s_in), _ood_scores(p_out, s_out)
    out: dict[str, float] = {}
    for name in scores_in:
        for metric, value in ood_metrics(scores_in[name], scores_out[name]).items():
            out[f"ood_{name}_{metric}"] = value
    return out
