"""Tests of uqlora.metrics: hand-computed values, differential checks against netcal,
torchmetrics, sklearn and independent numpy code, edge cases, validation and plots."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from uqlora import metrics as M
from uqlora.errors import UqloraError
from uqlora.metrics import calibration as cal


def dirichlet_data(seed: int, n: int, c: int):
    """Random Dirichlet(1) probabilities and uniformly random labels."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(c), size=n)
    labels = rng.integers(0, c, size=n)
    return probs, labels


def numpy_ece(conf, correct, n_bins):
    """Independent reference: explicit loop over [lo, hi) bins, last bin closed at 1."""
    conf, correct = np.asarray(conf, float), np.asarray(correct, float)
    total, worst = 0.0, 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        mask = (conf >= lo) & (conf < hi) if b < n_bins - 1 else (conf >= lo) & (conf <= hi)
        if mask.any():
            gap = abs(correct[mask].mean() - conf[mask].mean())
            total += mask.sum() / len(conf) * gap
            worst = max(worst, gap)
    return total, worst


# --------------------------------------------------------------------------- hand-computed

# Five examples, three classes. Confidence = max prob, prediction = argmax.
HAND_PROBS = np.array([
    [0.90, 0.05, 0.05],  # y=0: conf .90, correct
    [0.70, 0.20, 0.10],  # y=1: conf .70, wrong (predicts 0)
    [0.10, 0.65, 0.25],  # y=1: conf .65, correct
    [0.30, 0.25, 0.45],  # y=0: conf .45, wrong (predicts 2)
    [0.05, 0.10, 0.85],  # y=2: conf .85, correct
])
HAND_LABELS = np.array([0, 1, 1, 0, 2])


def test_hand_case_accuracy_nll_brier():
    # accuracy: 3 of 5 correct
    assert M.accuracy(HAND_PROBS, HAND_LABELS) == pytest.approx(0.6)
    # NLL: -(ln .90 + ln .20 + ln .65 + ln .30 + ln .85) / 5
    expected_nll = -(math.log(0.9) + math.log(0.2) + math.log(0.65) + math.log(0.3)
                     + math.log(0.85)) / 5
    assert M.nll(HAND_PROBS, HAND_LABELS) == pytest.approx(expected_nll, abs=1e-12)
    # Brier, per example sum_c (p_c - onehot_c)^2:
    #   ex1: .10^2 + .05^2 + .05^2             = .0100 + .0025 + .0025 = .015
    #   ex2: .70^2 + (.20-1)^2 + .10^2         = .49 + .64 + .01       = 1.14
    #   ex3: .10^2 + (.65-1)^2 + .25^2         = .01 + .1225 + .0625   = .195
    #   ex4: (.30-1)^2 + .25^2 + .45^2         = .49 + .0625 + .2025   = .755
    #   ex5: .05^2 + .10^2 + (.85-1)^2         = .0025 + .01 + .0225   = .035
    #   mean = (.015 + 1.14 + .195 + .755 + .035) / 5 = 2.14 / 5 = .428
    assert M.brier(HAND_PROBS, HAND_LABELS) == pytest.approx(0.428, abs=1e-12)


def test_hand_case_ece_mce_bins():
    # 5 bins: [0,.2) [.2,.4) [.4,.6) [.6,.8) [.8,1]
    #   [.4,.6): ex4 (.45, wrong)           acc 0,  conf .45   gap .45   weight 1/5
    #   [.6,.8): ex2 (.70 W), ex3 (.65 C)   acc .5, conf .675  gap .175  weight 2/5
    #   [.8,1] : ex1 (.90 C), ex5 (.85 C)   acc 1,  conf .875  gap .125  weight 2/5
    # ECE = .45/5 + .175*2/5 + .125*2/5 = .09 + .07 + .05 = .21 ; MCE = .45
    assert M.ece(HAND_PROBS, HAND_LABELS, n_bins=5) == pytest.approx(0.21, abs=1e-12)
    assert M.mce(HAND_PROBS, HAND_LABELS, n_bins=5) == pytest.approx(0.45, abs=1e-12)
    bins = M.reliability_bins(HAND_PROBS, HAND_LABELS, n_bins=5)
    np.testing.assert_allclose(bins["edges"], [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_array_equal(bins["count"], [0, 0, 1, 2, 2])
    np.testing.assert_allclose(bins["accuracy"], [np.nan, np.nan, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(bins["confidence"], [np.nan, np.nan, 0.45, 0.675, 0.875])
    # torchmetrics agrees on this case (no confidence is exactly 1.0)
    from torchmetrics.functional.classification import multiclass_calibration_error
    for norm, ours in (("l1", 0.21), ("max", 0.45)):
        tm = multiclass_calibration_error(torch.tensor(HAND_PROBS), torch.tensor(HAND_LABELS),
                                          num_classes=3, n_bins=5, norm=norm)
        assert float(tm) == pytest.approx(ours, abs=1e-6)


def test_hand_case_aurc_eaurc_misclf():
    conf, correct = cal.top_label(HAND_PROBS, HAND_LABELS)
    # Sorted by confidence: .90 C, .85 C, .70 W, .65 C, .45 W
    # risks k=1..5: 0/1, 0/2, 1/3, 1/4, 2/5 ; AURC = (1/3 + 1/4 + 2/5) / 5 = (59/60)/5 = 59/300
    coverage, risk = M.risk_coverage_curve(conf, correct)
    np.testing.assert_allclose(coverage, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0, 0, 1 / 3, 1 / 4, 2 / 5])
    assert M.aurc(conf, correct) == pytest.approx(59 / 300, abs=1e-12)
    # Oracle (3 correct first): risks 0, 0, 0, 1/4, 2/5 -> (1/4 + 2/5)/5 = 39/300
    # E-AURC = 59/300 - 39/300 = 20/300 = 1/15
    assert M.eaurc(conf, correct) == pytest.approx(1 / 15, abs=1e-12)
    # Error-detection AUROC: pairs (error, correct) where the error is less confident:
    #   .70 vs (.90 yes, .85 yes, .65 no) ; .45 vs all three yes -> 5/6
    assert M.misclassification_auroc(conf, correct) == pytest.approx(5 / 6, abs=1e-12)
    # Average precision, errors ranked by -conf: .45 (err, P=1/1), .65 (ok), .70 (err, P=2/3)
    #   AP = (1 + 2/3) / 2 = 5/6
    assert M.misclassification_auprc(conf, correct) == pytest.approx(5 / 6, abs=1e-12)


def test_aurc_hand_case_with_ties():
    # conf .9, .8, .8, .6 ; the stable sort keeps input order inside the .8 tie.
    # correct 1, 0, 1, 0 -> risks 0, 1/2, 1/3, 2/4 -> AURC = (1/2 + 1/3 + 1/2)/4 = 1/3
    conf = [0.9, 0.8, 0.8, 0.6]
    assert M.aurc(conf, [1, 0, 1, 0]) == pytest.approx(1 / 3, abs=1e-12)
    # Same examples with the tied pair swapped: correct 1, 1, 0, 0 -> risks 0, 0, 1/3, 1/2
    # AURC = (1/3 + 1/2)/4 = 5/24 (tie handling is input-order dependent, as documented)
    assert M.aurc(conf, [1, 1, 0, 0]) == pytest.approx(5 / 24, abs=1e-12)
    # oracle ranking of 2 correct / 2 wrong: risks 0, 0, 1/3, 1/2 -> E-AURC of the latter = 0
    assert M.eaurc(conf, [1, 1, 0, 0]) == pytest.approx(0.0, abs=1e-15)


# --------------------------------------------------------------------------- differential ECE


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c", [2, 5])
def test_ece_matches_netcal_torchmetrics_and_numpy(seed, c):
    from netcal.metrics import ECE
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, labels = dirichlet_data(seed, 1000, c)
    ours = M.ece(probs, labels, n_bins=15)
    conf, correct = cal.top_label(probs, labels)
    if c > 2:
        # netcal's multiclass mode takes the full [N, C] matrix and the labels.
        ref = ECE(bins=15).measure(probs, labels)
    else:
        # With <= 2 distinct labels netcal switches to *binary* mode and bins p(class 1)
        # rather than the top-label confidence; give it (confidence, correct) instead, which
        # is top-label ECE in its binary mode.
        ref = ECE(bins=15).measure(conf, correct.astype(np.int64))
    assert ours == pytest.approx(ref, abs=1e-6)

    ref_ece, ref_mce = numpy_ece(conf, correct, 15)
    assert ours == pytest.approx(ref_ece, abs=1e-12)
    assert M.mce(probs, labels) == pytest.approx(ref_mce, abs=1e-12)

    # torchmetrics computes in float32, hence the looser tolerance.
    t_probs, t_labels = torch.tensor(probs), torch.tensor(labels)
    tm_l1 = multiclass_calibration_error(t_probs, t_labels, num_classes=c, n_bins=15, norm="l1")
    tm_max = multiclass_calibration_error(t_probs, t_labels, num_classes=c, n_bins=15, norm="max")
    assert ours == pytest.approx(float(tm_l1), abs=1e-6)
    assert M.mce(probs, labels) == pytest.approx(float(tm_max), abs=1e-6)


def test_reliability_bins_agree_with_ece_and_numpy_histogram():
    probs, labels = dirichlet_data(3, 1000, 4)
    bins = M.reliability_bins(probs, labels)
    conf, correct = cal.top_label(probs, labels)
    counts, _ = np.histogram(conf, bins=np.linspace(0, 1, 16))
    np.testing.assert_array_equal(bins["count"], counts)
    ne = bins["count"] > 0
    from_bins = np.sum(bins["count"][ne] / 1000 * np.abs(bins["accuracy"][ne] - bins["confidence"][ne]))
    assert from_bins == pytest.approx(M.ece(probs, labels), abs=1e-15)
    assert bins["count"].sum() == 1000
    # C=4 -> confidence >= 1/4, so the first 3 bins ([0, .2)) are empty and NaN
    assert np.isnan(bins["confidence"][:3]).all()


def test_bin_edge_convention_matches_netcal_and_torchmetrics():
    # n_bins=2, confidence exactly 0.5 lies on the interior edge: it goes to the upper bin
    # [0.5, 1] (lo-inclusive), as in netcal and torchmetrics.
    probs = np.array([[0.5, 0.5], [0.7, 0.3], [0.2, 0.8]])
    labels = np.array([1, 0, 1])  # correct: no (argmax tie -> class 0), yes, yes
    bins = M.reliability_bins(probs, labels, n_bins=2)
    np.testing.assert_array_equal(bins["count"], [0, 3])
    # one bin: acc 2/3, conf (.5 + .7 + .8)/3 = 2/3 -> ECE 0
    assert M.ece(probs, labels, n_bins=2) == pytest.approx(0.0, abs=1e-12)


def test_confidence_one_edge_case_differs_from_torchmetrics():
    # Confidences .95 (correct) and exactly 1.0 (wrong), 15 bins.
    # Here and in netcal both share the last bin [14/15, 1]: acc .5, conf .975 -> ECE = MCE = .475
    # torchmetrics puts 1.0 in an extra bin: .5*|1-.95| + .5*|0-1| = .525, MCE = 1.0
    from netcal.metrics import ECE
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = np.array([[0.95, 0.05], [1.0, 0.0]])
    labels = np.array([0, 1])
    assert M.ece(probs, labels) == pytest.approx(0.475, abs=1e-12)
    assert M.mce(probs, labels) == pytest.approx(0.475, abs=1e-12)
    assert ECE(bins=15).measure(np.array([0.95, 1.0]), np.array([1, 0])) == pytest.approx(0.475, abs=1e-9)
    tm = multiclass_calibration_error(torch.tensor(probs), torch.tensor(labels), num_classes=2)
    assert float(tm) == pytest.approx(0.525, abs=1e-6)
    tm_max = multiclass_calibration_error(torch.tensor(probs), torch.tensor(labels), num_classes=2,
                                          norm="max")
    assert float(tm_max) == pytest.approx(1.0, abs=1e-6)


def test_ece_calibrated_and_overconfident():
    # Labels drawn from the predicted distribution -> calibrated -> ECE ~ 0
    rng = np.random.default_rng(0)
    n, c = 50_000, 5
    probs = rng.dirichlet(np.ones(c), size=n)
    labels = (rng.random(n)[:, None] > probs.cumsum(axis=1)).sum(axis=1)
    labels = np.minimum(labels, c - 1)
    assert M.ece(probs, labels) < 0.02
    # Always 100% confident but right 70% of the time -> ECE = MCE = |0.7 - 1.0| = 0.3
    n = 1000
    labels = rng.integers(0, 3, size=n)
    pred = labels.copy()
    pred[:300] = (labels[:300] + 1) % 3
    onehot = np.eye(3)[pred]
    assert M.accuracy(onehot, labels) == pytest.approx(0.7)
    assert M.ece(onehot, labels) == pytest.approx(0.3, abs=1e-12)
    assert M.mce(onehot, labels) == pytest.approx(0.3, abs=1e-12)
    # a zero probability on the true class is clamped at eps: -ln(1e-12) for the 30% wrong
    assert M.nll(onehot, labels) == pytest.approx(0.3 * -math.log(1e-12), rel=1e-12)


# --------------------------------------------------------------------------- selective


def test_aurc_oracle_and_random():
    rng = np.random.default_rng(1)
    correct = rng.random(20_000) < 0.8
    # oracle: confidence equal to correctness ranks every correct example first
    assert M.eaurc(correct.astype(float), correct) == 0.0
    oracle = M.aurc(correct.astype(float), correct)
    # reversed oracle is the worst ranking
    assert M.aurc(-correct.astype(float), correct) > oracle
    # random ranking: every prefix has the base error rate on average
    err = 1 - correct.mean()
    assert M.aurc(rng.random(20_000), correct) == pytest.approx(err, abs=0.01)
    # eaurc >= 0 for any ranking
    assert M.eaurc(rng.random(20_000), correct) > 0


def test_misclassification_auroc_matches_sklearn_and_pairwise():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    conf = np.round(rng.random(500), 2)  # rounded -> many ties
    correct = rng.random(500) < conf  # more confident -> more often right
    ours = M.misclassification_auroc(conf, correct)
    assert ours == pytest.approx(roc_auc_score(~correct, -conf), abs=1e-12)
    # independent pairwise (Mann-Whitney) count, ties count 1/2
    ce, cc = conf[~correct][:, None], conf[correct][None, :]
    pairwise = np.mean((ce < cc) + 0.5 * (ce == cc))
    assert ours == pytest.approx(pairwise, abs=1e-12)
    assert ours > 0.6
    # perfect separation: all errors less confident than all correct predictions
    conf = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    correct = np.array([0, 0, 0, 1, 1, 1])
    assert M.misclassification_auroc(conf, correct) == 1.0
    assert M.misclassification_auprc(conf, correct) == 1.0
    # undefined: no errors / only errors
    assert math.isnan(M.misclassification_auroc(conf, np.ones(6, bool)))
    assert math.isnan(M.misclassification_auprc(conf, np.zeros(6, bool)))


def test_entropy_mutual_information_disagreement_hand():
    # entropy of a uniform 4-class distribution is ln 4; 0 log 0 = 0 for one-hot
    np.testing.assert_allclose(M.entropy(np.array([[0.25] * 4, [1, 0, 0, 0]])), [math.log(4), 0.0])
    assert M.neg_entropy(np.array([[0.5, 0.5]]))[0] == pytest.approx(-math.log(2))
    np.testing.assert_allclose(M.max_prob(HAND_PROBS), [0.9, 0.7, 0.65, 0.45, 0.85])

    # identical samples -> MI 0 (up to the rounding of the mean, ~1e-16)
    probs, _ = dirichlet_data(4, 50, 3)
    same = np.stack([probs] * 5)
    np.testing.assert_allclose(M.mutual_information(same), 0.0, atol=1e-14)
    np.testing.assert_allclose(M.expected_entropy(same), M.entropy(probs))

    # 2 samples, 2 classes: p1 = (.8, .2), p2 = (.4, .6), mean (.6, .4)
    # H(mean) = -(.6 ln .6 + .4 ln .4); H1 = -(.8 ln .8 + .2 ln .2); H2 = -(.4 ln .4 + .6 ln .6)
    # MI = H(mean) - (H1 + H2)/2
    def h(*p):
        return -sum(x * math.log(x) for x in p)
    samples = np.array([[[0.8, 0.2]], [[0.4, 0.6]]])
    mi = h(0.6, 0.4) - (h(0.8, 0.2) + h(0.4, 0.6)) / 2
    assert M.mutual_information(samples)[0] == pytest.approx(mi, abs=1e-12)
    assert M.expected_entropy(samples)[0] == pytest.approx((h(0.8, 0.2) + h(0.4, 0.6)) / 2)
    # fully disagreeing one-hot samples: MI = ln 2
    assert M.mutual_information(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]))[0] == pytest.approx(math.log(2))

    # disagreement, S=4, N=2, C=3
    # ex0: argmaxes 0, 0, 1, 0; mean (.575, .325, .1) -> class 0; 1 of 4 differs -> 1/4
    # ex1: argmaxes 2, 1, 2, 2 ; mean (.1, .35, .55) -> class 2; 1 of 4 differs -> 1/4
    # (ex1 checks the mean's class, not the majority vote, is the reference:
    #  here both are 2; ex2 below separates them)
    samples = np.array([
        [[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]],
        [[0.6, 0.3, 0.1], [0.1, 0.6, 0.3]],
        [[0.3, 0.6, 0.1], [0.1, 0.3, 0.6]],
        [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]],
    ])
    np.testing.assert_allclose(M.disagreement(samples), [0.25, 0.25])
    # mean class differs from the majority vote: votes 0, 0, 1 but mean (.4, .6) -> class 1,
    # so 2 of 3 samples disagree with the mean's prediction -> 2/3
    samples = np.array([[[0.55, 0.45]], [[0.55, 0.45]], [[0.1, 0.9]]])
    assert M.disagreement(samples)[0] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- OOD


def test_ood_metrics_separated_identical_and_hand_fpr95():
    rng = np.random.default_rng(5)
    res = M.ood_metrics(rng.uniform(0.6, 1.0, 300), rng.uniform(0.0, 0.5, 200))
    assert res == pytest.approx({"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0},
                                abs=1e-12)

    same = M.ood_metrics(rng.normal(size=20_000), rng.normal(size=20_000))
    assert same["auroc"] == pytest.approx(0.5, abs=0.01)
    assert same["fpr95"] == pytest.approx(0.95, abs=0.01)
    assert same["aupr_in"] == pytest.approx(0.5, abs=0.01)

    # in = 1..20: accept >= 95% = 19 of them -> threshold = 19th largest = 2
    # out = .5, 1.5, 2, 2.5, 10: accepted (>= 2): 2, 2.5, 10 -> fpr95 = 3/5
    res = M.ood_metrics(np.arange(1, 21, dtype=float), [0.5, 1.5, 2.0, 2.5, 10.0])
    assert res["fpr95"] == pytest.approx(0.6)
    # AUROC: P(in > out) + 1/2 P(tie). per out: .5 -> 20/20, 1.5 -> 19/20, 2 -> (18 + .5)/20,
    #   2.5 -> 18/20, 10 -> (10 + .5)/20 ; mean = (20 + 19 + 18.5 + 18 + 10.5) / 100 = .86
    assert res["auroc"] == pytest.approx(0.86)


def test_fpr95_matches_roc_curve_definition():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(6)
    for n_in, n_out in ((1000, 700), (37, 53), (20, 20)):
        s_in = np.round(rng.normal(1.0, 1.0, n_in), 1)  # rounded -> ties
        s_out = np.round(rng.normal(0.0, 1.0, n_out), 1)
        y = np.r_[np.ones(n_in), np.zeros(n_out)]
        fpr, tpr, _ = roc_curve(y, np.r_[s_in, s_out], drop_intermediate=False)
        expected = fpr[np.argmax(tpr >= 0.95)]
        assert M.ood_metrics(s_in, s_out)["fpr95"] == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- evaluate


def _random_samples(seed, s, n, c):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(c) * 0.5, size=(s, n))


def test_evaluate_predictions_keys_and_types():
    probs, labels = dirichlet_data(7, 300, 4)
    res = M.evaluate_predictions(probs, labels)
    assert set(res) == set(M.PREDICTION_KEYS)
    samples = _random_samples(8, 6, 300, 4)
    res = M.evaluate_predictions(samples.mean(axis=0), labels, samples=samples)
    assert set(res) == set(M.PREDICTION_KEYS) | set(M.SAMPLE_KEYS)
    assert all(type(v) is float and math.isfinite(v) for v in res.values()), res
    assert res["n"] == 300.0
    assert 0 <= res["disagreement_mean"] <= 1 and res["mutual_information_mean"] >= 0
    json.dumps(res)
    # torch input (float32 / bfloat16 tensors) gives the same numbers as numpy float64
    t = M.evaluate_predictions(torch.tensor(probs, dtype=torch.float32), torch.tensor(labels))
    assert t["ece"] == pytest.approx(M.ece(probs.astype(np.float32), labels), abs=1e-12)
    assert t["acc"] == pytest.approx(M.accuracy(probs, labels))
    # bfloat16 tensors are converted (values exactly representable in bf16 here; bf16-rounded
    # softmax outputs in general can miss the 1e-3 row-sum tolerance)
    p16 = np.array([[0.5, 0.25, 0.25], [0.125, 0.75, 0.125]])
    bf = M.evaluate_predictions(torch.tensor(p16).to(torch.bfloat16), torch.tensor([0, 2]))
    assert bf["nll"] == pytest.approx(-(math.log(0.5) + math.log(0.125)) / 2, abs=1e-12)


def test_evaluate_ood_keys():
    p_in, _ = dirichlet_data(9, 200, 3)
    p_out, _ = dirichlet_data(10, 150, 3)
    res = M.evaluate_ood(p_in, p_out)
    assert set(res) == {f"ood_{s}_{m}" for s in M.OOD_SCORES for m in M.OOD_METRICS}
    s_in, s_out = _random_samples(11, 5, 200, 3), _random_samples(12, 5, 150, 3)
    res = M.evaluate_ood(s_in.mean(0), s_out.mean(0), samples_in=s_in, samples_out=s_out)
    scores = M.OOD_SCORES + M.OOD_SAMPLE_SCORES
    assert set(res) == {f"ood_{s}_{m}" for s in scores for m in M.OOD_METRICS}
    assert all(type(v) is float and math.isfinite(v) for v in res.values())
    # confident in-distribution vs flat OOD predictions: max_prob separates perfectly
    confident = np.tile([0.97, 0.02, 0.01], (50, 1))
    flat = np.tile([0.4, 0.3, 0.3], (40, 1))
    res = M.evaluate_ood(confident, flat)
    assert res["ood_max_prob_auroc"] == 1.0 and res["ood_max_prob_fpr95"] == 0.0
    assert res["ood_neg_entropy_auroc"] == 1.0
    with pytest.raises(ValueError, match="samples_in and samples_out"):
        M.evaluate_ood(p_in, p_out, samples_in=_random_samples(1, 2, 200, 3))


@pytest.mark.parametrize("probs, labels, match", [
    (np.array([[np.nan, 0.5], [0.5, 0.5], [np.nan, np.nan]]), [0, 1, 0], "NaN in 2 rows"),
    (np.array([[np.inf, 0.5], [0.5, 0.5]]), [0, 1], "inf in 1 row"),
    (np.array([0.5, 0.5]), [0, 1], "2-D"),
    (np.array([[0.5, 0.5], [0.2, 0.8]]), [[0], [1]], "1-D"),
    (np.array([[0.5, 0.5], [0.2, 0.8]]), [0, 1, 1], "length 3"),
    (np.array([[0.5, 0.5], [0.2, 0.8]]), [0, 2], "out of range"),
    (np.array([[0.5, 0.5], [0.2, 0.8]]), [-1, 0], "out of range"),
    (np.array([[0.5, 0.5], [0.2, 0.8]]), [0.5, 1.0], "integer"),
    (np.array([[2.0, 1.0], [0.2, 0.8]]), [0, 1], "sum to 1"),
    (np.array([[1.2, -0.2], [0.2, 0.8]]), [0, 1], "negative"),
    (np.zeros((0, 3)), [], "empty"),
])
def test_evaluate_predictions_validation(probs, labels, match):
    with pytest.raises(ValueError, match=match) as info:
        M.evaluate_predictions(probs, np.asarray(labels))
    assert isinstance(info.value, UqloraError)
    assert "\n" not in str(info.value)


def test_validation_of_samples_and_scores():
    probs, labels = dirichlet_data(0, 10, 3)
    with pytest.raises(ValueError, match="N=9"):
        M.evaluate_predictions(probs, labels, samples=_random_samples(0, 4, 9, 3))
    with pytest.raises(ValueError, match="3-D"):
        M.evaluate_predictions(probs, labels, samples=probs)
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(probs, labels, n_bins=0)
    with pytest.raises(ValueError, match="confidence has 1 NaN"):
        M.aurc([0.5, np.nan], [1, 0])
    with pytest.raises(ValueError, match="correct must be boolean or 0/1"):
        M.aurc([0.5, 0.4], [1, 2])
    with pytest.raises(ValueError, match="C=4"):
        M.evaluate_ood(probs, dirichlet_data(0, 10, 4)[0])


# --------------------------------------------------------------------------- plots


def test_plots_write_png(tmp_path):
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    from uqlora.metrics import plots

    figs_before = plt.get_fignums()
    probs, labels = dirichlet_data(13, 500, 4)
    out = M.reliability_diagram(probs, labels, tmp_path / "a" / "b" / "rel.png", title="test")
    assert out == tmp_path / "a" / "b" / "rel.png"
    assert out.is_file() and out.stat().st_size > 0
    img = mpimg.imread(out)
    w, h = plots.RELIABILITY_FIGSIZE
    assert img.shape[:2] == (round(h * plots.DPI), round(w * plots.DPI))
    assert img.shape[2] in (3, 4)

    conf, correct = cal.top_label(probs, labels)
    curves = {"max_prob": M.risk_coverage_curve(conf, correct),
              "neg_entropy": M.risk_coverage_curve(M.neg_entropy(probs), correct)}
    out2 = M.risk_coverage_plot(curves, str(tmp_path / "rc.png"))
    img = mpimg.imread(out2)
    w, h = plots.RISK_COVERAGE_FIGSIZE
    assert img.shape[:2] == (round(h * plots.DPI), round(w * plots.DPI))
    assert img.shape[2] in (3, 4)
    # overwriting works, no temp files are left behind, no pyplot figure stays open
    M.risk_coverage_plot({"only": curves["max_prob"]}, out2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "rc.png"]
    assert list((tmp_path / "a" / "b").iterdir()) == [out]
    assert plt.get_fignums() == figs_before
    with pytest.raises(ValueError, match="non-empty"):
        M.risk_coverage_plot({}, tmp_path / "x.png")
