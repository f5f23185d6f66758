"""Method-agnostic evaluation metrics for uncertainty estimation.

Inputs are predictive probabilities ``probs`` ``[N, C]``, optional per-sample probabilities
``samples`` ``[S, N, C]`` (sampling-based methods), integer ``labels`` ``[N]`` and confidence
scores ``[N]`` (higher = more confident), as numpy arrays or torch tensors. Everything is
computed in float64 numpy; scalar metrics are returned as Python floats.

Modules: :mod:`.calibration` (accuracy, NLL, Brier, ECE/MCE, reliability bins),
:mod:`.selective` (uncertainty scores, risk-coverage, AURC, misclassification detection),
:mod:`.ood` (OOD detection), :mod:`.evaluate` (one-call dicts), :mod:`.plots` (PNG figures,
imported lazily since it loads matplotlib).
"""
from uqlora.metrics._validation import MetricInputError
from uqlora.metrics.calibration import (accuracy, bin_edges, bin_indices, brier, ece, mce, nll,
                                        reliability_bins, top_label)
from uqlora.metrics.evaluate import (ERROR_DETECTION_METRICS, OOD_METRICS, OOD_SAMPLE_SCORES, OOD_SCORES,
                                     PREDICTION_KEYS, SAMPLE_KEYS, evaluate_error_detection, evaluate_ood,
                                     evaluate_predictions)
from uqlora.metrics.ood import fpr_at_tpr, ood_metrics
from uqlora.metrics.selective import (aurc, disagreement, eaurc, entropy, expected_entropy,
                                      max_prob, misclassification_auprc, misclassification_auroc,
                                      mutual_information, neg_entropy, risk_coverage_curve)

__all__ = [
    "MetricInputError",
    "accuracy", "nll", "brier", "ece", "mce", "reliability_bins", "top_label", "bin_edges",
    "bin_indices",
    "max_prob", "entropy", "neg_entropy", "mutual_information", "expected_entropy",
    "disagreement", "risk_coverage_curve", "aurc", "eaurc", "misclassification_auroc",
    "misclassification_auprc",
    "ood_metrics", "fpr_at_tpr",
    "evaluate_predictions", "evaluate_ood", "evaluate_error_detection", "ERROR_DETECTION_METRICS",
    "PREDICTION_KEYS", "SAMPLE_KEYS", "OOD_SCORES",
    "OOD_SAMPLE_SCORES", "OOD_METRICS",
    "reliability_diagram", "risk_coverage_plot",
]


def __getattr__(name: str):
    """Import the plotting functions (and matplotlib) only when first used."""
    if name in ("reliability_diagram", "risk_coverage_plot"):
        from uqlora.metrics import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
