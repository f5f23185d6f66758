"""AdUE (uncertainty head) and UAL (uncertainty-aware label smoothing): known answers and end-to-end runs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from test_swag import _cfg, _eval, _save_hydra
from uqlora.core.adue import AdUEHead, Cached, Mahalanobis, adue_loss, grid_search, smoothmax_uncertainty
from uqlora.core.scores import normalized_entropy, sr_uncertainty
from uqlora.errors import UqloraError
from uqlora.overrides import check_overrides
from uqlora.methods.base import smoothed_cross_entropy
from uqlora.core.ual import map_uncertainty
from uqlora.metrics import evaluate_error_detection
from uqlora.tasks import train

F64 = torch.float64


# --- SmoothMax, u_SR, L2-SP -------------------------------------------------------------------------------------
def test_smoothmax_tends_to_normalised_softmax_response_and_is_differentiable():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(50, 4, generator=g, dtype=F64).mul(2).softmax(-1)
    u_sr = (1 - p.max(-1).values) / (1 - 1 / 4)
    torch.testing.assert_close(sr_uncertainty(p), u_sr)
    gaps = [float((smoothmax_uncertainty(p, lam, eps=0.0) - u_sr).abs().max()) for lam in (10, 100, 1000, 1e5)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-4
    # (1/lam) logsumexp(lam p) >= max p: u never exceeds u_SR, and is within log(C)/lam of it
    u = smoothmax_uncertainty(p, 100.0, eps=0.0)
    assert (u <= u_sr + 1e-12).all() and ((u_sr - u) <= math.log(4) / 100 / 0.75 + 1e-12).all()
    logits = torch.randn(6, 3, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: smoothmax_uncertainty(z.softmax(-1), 20.0), (logits,))
    # masked choices: the same as dropping them
    mask = torch.tensor([[True, True, False]] * 6)
    pm = logits.detach().masked_fill(~mask, -1e4).softmax(-1)
    torch.testing.assert_close(smoothmax_uncertainty(pm, 50.0, mask), smoothmax_uncertainty(pm[:, :2], 50.0))
    torch.testing.assert_close(normalized_entropy(pm, mask), normalized_entropy(pm[:, :2]))
    assert float(normalized_entropy(torch.full((1, 5), 0.2, dtype=F64))) == pytest.approx(1.0)


def test_head_copy_starts_at_the_original_predictive_and_l2sp_is_zero():
    g = torch.Generator().manual_seed(1)
    W, b = torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
    h = torch.randn(20, 8, generator=g)
    z = h @ W.T + b
    head = AdUEHead("linear", 100.0, weight=W, bias=b)
    assert float(head.l2sp()) == 0.0
    torch.testing.assert_close(head.logits(h, z, None), z)
    torch.testing.assert_close(head(h, z), smoothmax_uncertainty(z.softmax(-1), 100.0))
    with torch.no_grad():
        head.weight.add_(0.5)
    assert float(head.l2sp()) == pytest.approx(0.25 * 24, rel=1e-6)   # sum of squares, no sqrt
    res = AdUEHead("residual", 100.0, dim=8)                            # cloze: a * z + f w, a=1, w=0
    f3 = torch.randn(20, 3, 8, generator=g)
    torch.testing.assert_close(res.logits(f3, z, None), z)
    assert float(res.l2sp()) == 0.0
    errors = (torch.rand(20, generator=g) < 0.3).float()
    loss, u = adue_loss(head, h, z, None, errors, alpha_reg=0.5, alpha_l2sp=0.1)
    u_sr = sr_uncertainty(z.softmax(-1))
    expect = F.binary_cross_entropy(u, errors) + 0.5 * ((u - u_sr) ** 2).mean() + 0.1 * 0.25 * 24
    assert float(loss) == pytest.approx(float(expect), rel=1e-5)


def test_head_learns_errors_the_softmax_response_cannot_see():
    """Errors concentrate on moderately confident class-0 predictions (0 < h0 < 1.5), which the symmetric
    softmax response cannot single out; shifting the head's bias can. The trained head beats SR."""
    g = torch.Generator().manual_seed(2)
    d, C = 6, 2

    def make(n):
        h = torch.randn(n, d, generator=g)
        z = torch.stack([h[:, 0], -h[:, 0]], 1) * 2
        y = z.argmax(-1)
        flip = torch.rand(n, generator=g) < torch.where((h[:, 0] > 0) & (h[:, 0] < 1.5), 0.45, 0.03)
        return Cached(h, z, None, torch.where(flip, 1 - y, y))

    train, val = make(1500), make(600)
    W = torch.tensor([[2.0, 0, 0, 0, 0, 0], [-2.0, 0, 0, 0, 0, 0]])
    init = AdUEHead("linear", 100.0, weight=W, bias=torch.zeros(C))
    head, records, chosen = grid_search(init, train, val, [1e-2], [0.01], [0.0, 1.0], progress=False, epochs=15, patience=5)
    assert len(records) == 2 and all(r["best_epoch"] >= 1 for r in records)
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        u = head(val.feats, val.logits)
    sr = sr_uncertainty(val.logits.softmax(-1))
    auc_head, auc_sr = roc_auc_score(val.errors, u), roc_auc_score(val.errors, sr)
    assert auc_head > auc_sr + 0.1, (auc_head, auc_sr)
    best = max(records, key=lambda r: r["val_auroc"])
    assert best["val_auroc"] == pytest.approx(auc_head, abs=1e-9)
    assert best["alpha_l2sp"] == 0.0   # anchoring to the (blind) initial head can only hurt here


def test_mahalanobis_matches_the_dense_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 4, generator=g, dtype=F64) @ torch.randn(4, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (300,), generator=g)
    m = Mahalanobis.fit(x, y)
    mus = [x[y == c].mean(0) for c in range(3)]
    cov = sum((x[y == c] - mus[c]).T @ (x[y == c] - mus[c]) for c in range(3)) / 300
    P = torch.linalg.inv(cov)
    q = torch.randn(10, 4, generator=g, dtype=F64)
    expect = torch.stack([torch.stack([(v - mu) @ P @ (v - mu) for mu in mus]).min() for v in q])
    torch.testing.assert_close(m.score(q), expect)
    one = Mahalanobis.fit(x, None)
    assert one.means.shape == (1, 4)


def test_error_detection_metrics_known_answers():
    correct = np.array([True, True, True, False, False])
    perfect = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    m = evaluate_error_detection({"p": perfect, "rev": 1 - perfect}, correct, n_bins=2, probability_scores=("p",))
    assert m["errdet_p_auroc"] == 1.0 and m["errdet_rev_auroc"] == 0.0 and m["errdet_p_auprc"] == 1.0
    # bins [0, .5): u = .1,.2,.3 (no errors) -> |0.2 - 0|; [.5, 1]: .8,.9 (all errors) -> |0.85 - 1|
    assert m["errdet_p_ece"] == pytest.approx(3 / 5 * 0.2 + 2 / 5 * 0.15)
    assert "errdet_rev_ece" not in m
    assert m["errdet_p_aurc"] < m["errdet_rev_aurc"]
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_error_detection({"x": np.array([0.1, np.nan, 0, 0, 0])}, correct)


# --- UAL ------------------------------------------------------------------------------------------------------------
def test_ual_loss_is_label_smoothing_when_uncertainties_are_equal_and_ce_at_zero():
    g = torch.Generator().manual_seed(4)
    logits, y = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    eps = torch.as_tensor(map_uncertainty(np.full(16, 0.37), "mean_scaled", eps_mean=0.1), dtype=torch.float32)
    torch.testing.assert_close(eps, torch.full((16,), 0.1))
    torch.testing.assert_close(smoothed_cross_entropy(logits, y, eps), F.cross_entropy(logits, y, label_smoothing=0.1))
    lin = torch.as_tensor(map_uncertainty(np.full(16, 0.5), "linear", eps_min=0.0, eps_max=0.4), dtype=torch.float32)
    torch.testing.assert_close(smoothed_cross_entropy(logits, y, lin), F.cross_entropy(logits, y, label_smoothing=0.2))
    zero = torch.as_tensor(map_uncertainty(np.random.default_rng(0).random(16), "mean_scaled", eps_mean=0.0))
    torch.testing.assert_close(smoothed_cross_entropy(logits, y, zero.float()), F.cross_entropy(logits, y))
    # per-example: the mean of the per-example smoothed losses
    e = torch.linspace(0, 0.5, 16)
    per = torch.stack([F.cross_entropy(logits[i:i + 1], y[i:i + 1], label_smoothing=float(e[i])) for i in range(16)])
    torch.testing.assert_close(smoothed_cross_entropy(logits, y, e), per.mean())


def test_mean_scaled_mapping_keeps_the_mean_the_order_and_the_cap():
    u = np.random.default_rng(1).beta(0.5, 2.0, size=500)
    eps = map_uncertainty(u, "mean_scaled", eps_mean=0.3, eps_cap=0.5)
    assert abs(eps.mean() - 0.3) < 1e-3 and eps.max() <= 0.5 + 1e-12
    assert (np.diff(eps[np.argsort(u)]) >= -1e-12).all()          # monotone in u
    np.testing.assert_allclose(eps[eps < 0.5] / u[eps < 0.5], (eps[eps < 0.5] / u[eps < 0.5])[0])  # proportional
    with pytest.raises(UqloraError, match="valid choices: mean_scaled, linear"):
        map_uncertainty(u, "nosuch")
    with pytest.raises(UqloraError, match=r"in \[0, 1\]"):
        map_uncertainty(np.array([0.2, 1.5]), "linear")


TINY = ["model=tiny_bert", "trainer.max_steps=6", "data.max_train_samples=48", "data.max_test_samples=24",
        "data.max_val_samples=16"]


def test_ual_teacher_uncertainties_are_cached_and_reused(tmp_path, monkeypatch):
    teacher_cfg = _cfg(tmp_path, "teacher", *TINY, "method=ensemble", "method.num_models=2")
    _, tobj = train(teacher_cfg)
    _save_hydra(teacher_cfg, tobj["run_dir"])
    args = [*TINY, "method=ual", f"method.teacher_run={tobj['run_dir']}", f"method.cache_dir={tmp_path / 'cache'}"]
    m1, o1 = train(_cfg(tmp_path, "ual1", *args))
    post = json.loads((o1["run_dir"] / "results.json").read_text())["train"]["posthoc"]
    assert post["teacher_cache_hit"] is False and abs(post["eps_mean"] - 0.1) < 1e-3
    cached = json.loads(open(post["teacher_cache"]).read())
    assert len(cached["u"]) == 48 and len(cached["identity"]["members"]) == 2
    # the teacher's normalised entropy of its pooled predictive on the training examples
    from uqlora.sources import RunAccess

    calls = []
    real = RunAccess.predictions
    monkeypatch.setattr(RunAccess, "predictions", lambda *a, **k: calls.append(1) or real(*a, **k))
    m2, o2 = train(_cfg(tmp_path, "ual2", *args))
    post2 = json.loads((o2["run_dir"] / "results.json").read_text())["train"]["posthoc"]
    assert post2["teacher_cache_hit"] is True and post2["teacher_cache"] == post["teacher_cache"] and not calls
    assert m2["test"]["nll"] == pytest.approx(m1["test"]["nll"], abs=1e-6)   # same smoothing, same run
    # another score is another cache entry (computed, not read)
    _, o3 = train(_cfg(tmp_path, "ual3", *args, "method.teacher_score=sr"))
    post3 = json.loads((o3["run_dir"] / "results.json").read_text())["train"]["posthoc"]
    assert post3["teacher_cache_hit"] is False and calls


def test_ual_column_source_and_bad_inputs(tmp_path):
    rows = [{"id": f"r{i}", "text": f"example number {i} is {'good' if i % 2 else 'bad'}", "label": i % 2,
             "u": round((i % 7) / 6, 3)} for i in range(60)]
    for split in ("train", "test"):
        with open(tmp_path / f"{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    data = ["data=custom_classification", f"data.options.files={{train: {tmp_path}/train.jsonl, test: {tmp_path}/test.jsonl}}",
            "data.options.num_classes=2"]
    with pytest.raises(UqloraError, match="no 'uncertainty' field"):
        train(_cfg(tmp_path, "nocol", "model=tiny_bert", "trainer.max_steps=2", *data, "method=ual",
                   "method.uncertainty_source=column"))
    m, o = train(_cfg(tmp_path, "col", "model=tiny_bert", "trainer.max_steps=4", *data, "method=ual",
                      "method.uncertainty_source=column", "data.options.uncertainty_column=u", "method.mapping=linear"))
    post = json.loads((o["run_dir"] / "results.json").read_text())["train"]["posthoc"]
    assert post["eps_min"] == pytest.approx(0.0) and post["eps_max"] == pytest.approx(0.3)
    with pytest.raises(UqloraError, match="needs method.teacher_run"):
        train(_cfg(tmp_path, "nt", *TINY, "method=ual"))
    with pytest.raises(UqloraError, match="loss.label_smoothing must be 0"):
        train(_cfg(tmp_path, "ls", *TINY, "method=ual", "loss.label_smoothing=0.1"))
    with pytest.raises(UqloraError, match="valid choices: column, teacher"):  # refused when composed
        check_overrides(["method=ual", "method.uncertainty_source=nosuch"])
    with pytest.raises(UqloraError, match="valid choices: others, uniform"):
        check_overrides(["method=ual", "method.smoothing_target=nosuch"])


def test_sr_ece_scores_the_probability_of_error_not_the_rescaled_score(tmp_path):
    """A perfectly calibrated binary model (max p = 0.75 everywhere, exactly 25% wrong; then max p in {0.6, 0.9}
    with 40% / 10% wrong): SR's probability of error 1 - max p is calibrated, so its ECE is 0 -- while the
    rescaled ranking score (1 - max p) / (1 - 1/C) = 0.5 would give 0.25. Ranking metrics keep the rescaled
    score. Checked through the pipeline's error-detection step, which supplies SR's probability of error."""
    from omegaconf import OmegaConf

    from uqlora.metrics import misclassification_auroc
    from uqlora.methods.adue import AdUEMethod
    from uqlora.report import error_detection

    cfg = OmegaConf.create({"method": {"name": "adue"}, "model": {"name": "m"}, "data": {"name": "d"}})
    cases = [(np.full(400, 0.75), np.arange(400) < 100),
             (np.repeat([0.6, 0.9], 200), np.r_[np.arange(200) < 80, np.arange(200) < 20])]
    for conf, wrong in cases:
        probs = np.stack([conf, 1 - conf], 1)
        labels = np.where(wrong, 1, 0)
        u_sr = sr_uncertainty(torch.as_tensor(probs)).numpy()
        m = error_detection(cfg, tmp_path, "test", {"probs": probs, "labels": labels}, {"sr": u_sr}, 15, None,
                            AdUEMethod.probability_scores)
        assert m["errdet_sr_ece"] == pytest.approx(0.0, abs=1e-12)
        assert m["errdet_sr_auroc"] == pytest.approx(misclassification_auroc(-u_sr, ~wrong), nan_ok=True)
    direct = evaluate_error_detection({"sr": u_sr}, ~wrong, probability_scores=("sr",))
    assert direct["errdet_sr_ece"] == pytest.approx(0.5 * abs(0.8 - 0.4) + 0.5 * abs(0.2 - 0.1))  # u as if a probability
    with pytest.raises(ValueError, match="probability of error of 'sr'"):
        evaluate_error_detection({"sr": u_sr}, ~wrong, probability_scores=("sr",), error_probabilities={"sr": u_sr + 1})


@pytest.mark.parametrize("target,true_mass", [("others", 0.70), ("uniform", 0.85)])
def test_ual_smoothing_target_others_is_the_authors_and_uniform_is_label_smoothing(target, true_mass):
    """C = 2, eps = 0.3: the loss is the cross-entropy against (0.70, 0.30) with the authors' target (1 - eps on
    the true class, eps / (C - 1) on each other) and (0.85, 0.15) with uniform smoothing; its gradient w.r.t.
    the logits is (p - target) / B, so the target is read back from the gradient. eps = 0: plain CE."""
    from conftest import compose
    from uqlora.build import setup

    def ual_cross_entropy(z, y, eps, mask, target):
        return smoothed_cross_entropy(z, y, eps, mask, others_only=target == "others")

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(8, 2, generator=g, requires_grad=True)
    y = torch.randint(0, 2, (8,), generator=g)
    loss = ual_cross_entropy(logits, y, 0.3, None, target)
    grad, = torch.autograd.grad(loss, logits)
    q = logits.detach().softmax(-1) - 8 * grad
    torch.testing.assert_close(q[torch.arange(8), y], torch.full((8,), true_mass), atol=1e-6, rtol=0)
    torch.testing.assert_close(q.sum(1), torch.ones(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(ual_cross_entropy(logits, y, 0.0, None, target), F.cross_entropy(logits, y))
    torch.testing.assert_close(ual_cross_entropy(logits, y, torch.zeros(8), None, target), F.cross_entropy(logits, y))
    # three choices, the third masked: it gets nothing; the true class keeps 0.70 (others) or 0.85 (uniform)
    z3 = torch.cat([logits.detach(), torch.full((8, 1), -1e9)], 1).requires_grad_(True)
    mask = torch.tensor([[True, True, False]]).expand(8, 3)
    grad3, = torch.autograd.grad(ual_cross_entropy(z3, y, 0.3, mask, target), z3)
    q3 = z3.detach().softmax(-1) - 8 * grad3
    torch.testing.assert_close(q3[:, :2], q, atol=1e-6, rtol=0)
    assert q3[:, 2].abs().max() < 1e-6
    # the method uses the configured target (default: others)
    cfg = compose(["model=tiny_bert", "method=ual", "logger=none", f"method.smoothing_target={target}"])
    assert str(compose(["method=ual"]).method.smoothing_target) == "others"
    method, _ = setup(cfg)
    batch = {"labels": y, "label_smoothing": torch.full((8,), 0.3)}
    torch.testing.assert_close(method.loss(logits.detach(), batch), ual_cross_entropy(logits.detach(), y, 0.3, None, target))


# --- AdUE end to end ------------------------------------------------------------------------------------------------
def test_adue_run_reuses_map_run_keeps_predictions_and_eval_reuses_head(tmp_path):
    map_cfg = _cfg(tmp_path, "map", *TINY, "method=map")
    m_map, omap = train(map_cfg)
    _save_hydra(map_cfg, omap["run_dir"])
    cfg = _cfg(tmp_path, "adue", *TINY, "method=adue", f"method.map_run={omap['run_dir']}",
               "method.grid.lr=[1e-3]", "method.grid.alpha_reg=[0.1]", "method.grid.alpha_l2sp=[0.01,0.1]",
               "method.epochs=5")
    m, obj = train(cfg)
    run = obj["run_dir"]
    _save_hydra(cfg, run)
    res = json.loads((run / "results.json").read_text())
    assert res["train"]["map_run"] == str(omap["run_dir"]) and "steps" not in res["train"]
    assert len(res["train"]["posthoc"]["grid"]) == 2
    a, b = np.load(omap["run_dir"] / "predictions" / "test.npz"), np.load(run / "predictions" / "test.npz")
    np.testing.assert_allclose(b["probs"], a["probs"], atol=1e-6)        # AdUE never changes the predictions
    for s in ("adue", "sr", "entropy", "mahalanobis"):
        assert b[f"u_{s}"].shape == (24,) and f"errdet_{s}_auroc" in m["test"]
    assert 0 < b["u_adue"].min() and b["u_adue"].max() < 1 and "errdet_adue_ece" in m["test"]
    assert (run / "plots" / "risk_coverage_test.png").is_file()
    again, _ = _eval(tmp_path, run)
    for k in ("errdet_adue_auroc", "errdet_mahalanobis_auroc", "acc", "nll"):
        assert again["test"][k] == pytest.approx(m["test"][k], abs=1e-6, nan_ok=True)


@pytest.mark.parametrize("bad,match", [
    ("method.fit_split=test", "unknown method.fit_split 'test'; valid choices: train, calib, val"),
    ("method.select_split=train", "both 'train'"),
    ("method.lam=0", "method.lam=0.0 is impossible; valid: a finite number > 0"),
])
def test_bad_adue_options_fail_with_one_line(tmp_path, bad, match):
    with pytest.raises(UqloraError, match=match) as e:
        check_overrides(["method=adue", bad])  # a choice outside its enumeration: refused when composed
        train(_cfg(tmp_path, "x", *TINY, "method=adue", bad))  # a range or a cross-field rule: before anything loads
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model,data,extra", [
    ("minilm", "sst2", ["trainer.max_steps=30", "data.max_train_samples=160", "data.max_test_samples=96"]),
    ("smollm2_135m", "arc_e", ["trainer.max_steps=2", "data.max_train_samples=8", "data.max_test_samples=4",
                               "data.batch_size=2", "data.max_val_samples=4", "data.eval_batch_size=4"]),
])
def test_real_model_adue_run(tmp_path, model, data, extra):
    cfg = _cfg(tmp_path, "run", f"model={model}", f"data={data}", "method=adue", "method.grid.lr=[1e-3]",
               "method.grid.alpha_reg=[0.1]", "method.grid.alpha_l2sp=[0.1]", "method.epochs=5", *extra)
    m, objs = train(cfg)
    p = np.load(objs["run_dir"] / "predictions" / "test.npz")
    assert np.isfinite(p["u_adue"]).all() and np.isfinite(p["u_mahalanobis"]).all()
    assert "errdet_adue_auroc" in m["test"]
    state = torch.load(objs["run_dir"] / "checkpoints" / "method_state.pt", weights_only=True)
    assert state["head_config"]["kind"] == ("linear" if model == "minilm" else "residual")
