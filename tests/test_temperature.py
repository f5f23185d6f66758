"""Temperature scaling: the fit recovers a known temperature and never raises the calibration NLL; end-to-end
runs (MAP training; on top of another method's finished run) and eval.py reproduction."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from test_swag import _cfg, _eval, _save_hydra
from uqlora.core.temperature import apply_temperature, fit_temperature
from uqlora.errors import UqloraError
from uqlora.tasks import train

F64 = torch.float64
TINY = ["model=tiny_bert", "trainer.max_steps=6", "data.max_test_samples=24"]


def _nll(z, y, T):
    return float(F.cross_entropy(z.double() / T, y))


def _softmax_T(probs: np.ndarray, T: float) -> np.ndarray:
    logp = np.log(probs.astype(np.float64)) / T
    e = np.exp(logp - logp.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --- the fit ----------------------------------------------------------------------------------------------------
def test_fit_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 5, generator=g, dtype=F64) * 3
    y = torch.multinomial((z / 2.5).softmax(-1), 1, generator=g).squeeze(1)
    T, info = fit_temperature(z, y)
    # the sampling error of T-hat at N=20000 is about 0.015 (seeds 0-4: 2.500 .. 2.528)
    assert abs(T - 2.5) < 0.05, T
    assert info["temperature"] == T and info["n_fit"] == 20000 and info["iterations"] >= 1
    assert info["nll_before"] == pytest.approx(_nll(z, y, 1.0), abs=1e-12)
    assert info["nll_after"] == pytest.approx(_nll(z, y, T), abs=1e-12)
    # a minimum: no better T nearby, and not worse than the true one
    assert all(_nll(z, y, T * f) >= info["nll_after"] - 1e-12 for f in (0.99, 1.01))
    assert info["nll_after"] <= _nll(z, y, 2.5) + 1e-12
    # logits and log-probabilities are the same input (a per-row constant cancels)
    T2, _ = fit_temperature(z.log_softmax(-1) + 7.0, y)
    assert T2 == pytest.approx(T, rel=1e-6)
    # float32 input and a float32 result of apply_temperature
    p = apply_temperature(z.float(), T)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, (z / T).softmax(-1).float())


@pytest.mark.parametrize("case", ["calibrated", "overconfident", "underconfident", "random_labels", "anti_argmax",
                                  "few_examples"])
def test_fit_never_raises_the_calibration_nll(case):
    g = torch.Generator().manual_seed(1)
    n = 6 if case == "few_examples" else 3000
    z = torch.randn(n, 4, generator=g, dtype=F64) * 2
    sample = lambda t: torch.multinomial((z / t).softmax(-1), 1, generator=g).squeeze(1)  # noqa: E731
    y = {"calibrated": lambda: sample(1.0), "overconfident": lambda: sample(3.0), "underconfident": lambda: sample(0.4),
         "random_labels": lambda: torch.randint(0, 4, (n,), generator=g), "anti_argmax": lambda: (-z).argmax(-1),
         "few_examples": lambda: sample(1.0)}[case]()
    T, info = fit_temperature(z, y)
    assert math.isfinite(T) and T > 0
    assert info["nll_after"] <= info["nll_before"] + 1e-12
    assert info["nll_after"] == pytest.approx(_nll(z, y, T), abs=1e-12)
    if case == "calibrated":
        assert abs(T - 1) < 0.1
    if case == "overconfident":
        assert T > 2
    if case == "underconfident":
        assert T < 0.6
    if case in ("random_labels", "anti_argmax"):  # the optimum is (near) the uniform predictive
        assert T > 10 and info["nll_after"] < math.log(4) + 0.02


def test_fit_falls_back_to_one_when_it_cannot_improve(monkeypatch):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(200, 3, generator=g, dtype=F64)
    y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)

    class NoStep(torch.optim.LBFGS):  # an optimiser that wanders off to a worse T
        def step(self, closure):
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(3.0)

    monkeypatch.setattr(torch.optim, "LBFGS", NoStep)
    T, info = fit_temperature(z, y)
    assert T == 1.0 and info["nll_after"] == info["nll_before"]


def test_argmax_labels_and_masked_choices():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(400, 5, generator=g, dtype=F64)
    z[:, 3:] = -1e9                       # two padded choices
    z[:10, 4] = float("-inf")             # -inf works too (clamped to a finite value)
    y = z.argmax(-1)                      # every label is the argmax: T -> small (bounded)
    T, info = fit_temperature(z, y)
    assert 0 < T < 0.05 and info["nll_after"] < 0.1 * info["nll_before"]
    for t in (T, 1.0, 50.0, 1000.0):
        p = apply_temperature(z, t)
        assert torch.isfinite(p).all() and (p[:, 3:] == 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(400, dtype=F64))
    assert (apply_temperature(z, T).argmax(-1) == y).all()
    with pytest.raises(UqloraError, match="NaN"):
        fit_temperature(torch.full((2, 2), float("nan")), torch.tensor([0, 1]))
    with pytest.raises(UqloraError, match="labels must be in 0..4"):
        fit_temperature(z, torch.full((400,), 5))
    with pytest.raises(UqloraError, match="> 0"):
        apply_temperature(z, 0.0)


# --- end to end -----------------------------------------------------------------------------------------------------
def test_temperature_run_is_map_plus_t_and_eval_reproduces(tmp_path):
    cfg = _cfg(tmp_path, "t", *TINY, "method=temperature")
    m, obj = train(cfg)
    run, method = obj["run_dir"], obj["method"]
    state = torch.load(run / "checkpoints" / "method_state.pt", weights_only=True)
    T = float(state["temperature"][0])
    assert T == method.temperature and T > 0 and "base" not in state and method.base is None
    tuning = method.tuning
    assert tuning["temperature"] == T and tuning["split"] == "calib" and tuning["n_fit"] == 32
    assert tuning["nll_after"] <= tuning["nll_before"] + 1e-12
    res = json.loads((run / "results.json").read_text())
    assert res["train"]["posthoc"]["temperature"] == T and res["train"]["steps"] == 6  # it trained MAP
    # the calib NLL reported is that of the saved model's logits
    log_p, labels = method.calibration_log_probs(obj["datamodule"], "calib")
    assert _nll(log_p, labels, T) == pytest.approx(tuning["nll_after"], abs=1e-6)
    assert _nll(log_p, labels, 1.0) == pytest.approx(tuning["nll_before"], abs=1e-6)

    # the same seed and overrides with method=map: the same adapter; our probs are its probs at temperature T
    m_map, omap = train(_cfg(tmp_path, "m", *TINY, "method=map"))
    p_map = np.load(omap["run_dir"] / "predictions" / "test.npz")
    p_t = np.load(run / "predictions" / "test.npz")
    assert "samples" not in p_t and p_t["probs"].shape == (24, 2)
    np.testing.assert_array_equal(p_t["labels"], p_map["labels"])
    np.testing.assert_allclose(p_t["probs"], _softmax_T(p_map["probs"], T), atol=1e-5)
    assert m["test"]["acc"] == pytest.approx(m_map["test"]["acc"])  # T never changes the argmax

    _save_hydra(cfg, run)
    again, _ = _eval(tmp_path, run)  # from the saved adapter and temperature, no refit
    for k in ("acc", "nll", "ece", "brier"):
        assert again["test"][k] == pytest.approx(m["test"][k], abs=1e-6)


SWAG = ["method=swag", "method.collect_every=2", "trainer.max_steps=12", "method.num_samples=3"]


def test_temperature_on_top_of_a_swag_run(tmp_path):
    base_cfg = _cfg(tmp_path, "swag", *TINY, *SWAG)
    _, bobj = train(base_cfg)
    base = bobj["run_dir"]
    _save_hydra(base_cfg, base)
    p_base = np.load(base / "predictions" / "test.npz")
    assert "samples" in p_base

    cfg = _cfg(tmp_path, "t", *TINY, "method=temperature", f"method.map_run={base}")
    m, obj = train(cfg)
    run, method = obj["run_dir"], obj["method"]
    assert method.base is not None and method.base.name == "swag" and method.base.backbone is method.backbone
    res = json.loads((run / "results.json").read_text())
    assert res["train"]["map_run"] == str(base) and "steps" not in res["train"]  # no training
    assert res["train"]["posthoc"]["base_method"] == "swag"
    T = method.temperature
    assert T != 1.0 and method.tuning["nll_after"] < method.tuning["nll_before"]  # fitted, and it helped
    state = torch.load(run / "checkpoints" / "method_state.pt", weights_only=True)
    assert float(state["temperature"][0]) == T and state["base"]["n"] == bobj["method"].swag.n   # SWAG moments copied
    assert state["base_method_config"]["name"] == "swag"                 # ... and the config that rebuilds SWAG
    p = np.load(run / "predictions" / "test.npz")
    assert "samples" not in p                               # pooled, then calibrated: samples dropped
    np.testing.assert_allclose(p["probs"].sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(p["probs"], _softmax_T(p_base["probs"], T), atol=1e-5)  # the same S draws

    _save_hydra(cfg, run)
    base.rename(base.with_name("gone"))  # the run directory alone restores it: SWAG rebuilt from our saved state
    again, _ = _eval(tmp_path, run)
    for k in ("acc", "nll", "ece", "brier"):
        assert again["test"][k] == pytest.approx(m["test"][k], abs=1e-6)


@pytest.mark.parametrize("base_method,extra", [
    # a predictive that needs gradients (GLM Jacobians): predicted under no_grad, not inference_mode. The evidence's
    # prior leaves this tiny model miscalibrated, so the temperature has something to fit; the default val_nll
    # prior already calibrates it on these few examples (T = 1 is then the right answer, not a test of the fit)
    ("laplace", ["method.prior.method=marglik"]),
    ("adue", ["method.grid.lr=[1e-3]", "method.grid.alpha_reg=[0.1]", "method.grid.alpha_l2sp=[0.1]",
              "method.epochs=2"]),
])
def test_temperature_on_top_of_posthoc_methods(tmp_path, base_method, extra):
    base_cfg = _cfg(tmp_path, base_method, *TINY, f"method={base_method}", *extra)
    _, bobj = train(base_cfg)
    base = bobj["run_dir"]
    _save_hydra(base_cfg, base)
    cfg = _cfg(tmp_path, "t", *TINY, "method=temperature", f"method.map_run={base}")
    m, obj = train(cfg)
    method = obj["method"]
    assert method.base is not None and method.base.name == base_method
    a, b = np.load(base / "predictions" / "test.npz"), np.load(obj["run_dir"] / "predictions" / "test.npz")
    T = method.temperature
    assert T != 1.0 and method.tuning["nll_after"] < method.tuning["nll_before"]
    np.testing.assert_allclose(b["probs"], _softmax_T(a["probs"], T), atol=1e-5)
    for k in (k for k in a if k.startswith("u_")):  # AdUE's per-example scores pass through unchanged
        np.testing.assert_allclose(b[k], a[k], atol=1e-6)
    assert set(a) - set(b) <= {"samples"}
    _save_hydra(cfg, obj["run_dir"])
    again, _ = _eval(tmp_path, obj["run_dir"])
    for k in ("acc", "nll", "ece"):
        assert again["test"][k] == pytest.approx(m["test"][k], abs=1e-6)


def test_temperature_one_on_mc_dropout_is_the_base_predictive(tmp_path, monkeypatch):
    base_cfg = _cfg(tmp_path, "mcd", *TINY, "method=mc_dropout", "method.num_samples=3")
    _, bobj = train(base_cfg)
    base = bobj["run_dir"]
    _save_hydra(base_cfg, base)
    from uqlora.methods import temperature as tmod

    real, fits = tmod.fit_temperature, []

    def fit_then_force_one(log_p, labels, **kw):  # the fit runs (and is recorded); T = 1 is kept
        fits.append(real(log_p, labels, **kw))
        return 1.0, {**fits[-1][1], "temperature": 1.0, "nll_after": fits[-1][1]["nll_before"]}

    monkeypatch.setattr(tmod, "fit_temperature", fit_then_force_one)
    m, obj = train(_cfg(tmp_path, "t1", *TINY, "method=temperature", f"method.map_run={base}", "method.split=val"))
    assert len(fits) == 1 and obj["method"].temperature == 1.0 and obj["method"].tuning["split"] == "val"
    a, b = np.load(base / "predictions" / "test.npz"), np.load(obj["run_dir"] / "predictions" / "test.npz")
    np.testing.assert_allclose(b["probs"], a["probs"], atol=1e-6)  # same dropout masks (eval_seed), T = 1
    assert "samples" in a and "samples" not in b


# --- bad inputs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["test", "train"])
def test_fitting_on_test_or_train_fails_with_one_line(tmp_path, split):
    from uqlora.overrides import check_overrides

    with pytest.raises(UqloraError) as e:  # refused when the config is composed, before anything runs
        check_overrides(["method=temperature", f"method.split={split}"])
    msg = str(e.value)
    assert "\n" not in msg and f"'{split}'" in msg and "valid choices: calib, val" in msg


def _fake_run(tmp_path, name, *overrides, members=0):
    """A run directory with a config and empty adapter files (enough for the checks before any loading)."""
    cfg = _cfg(tmp_path, name, *TINY, *overrides)
    run = tmp_path / name
    for d in [run / "members" / str(m) for m in range(members)] or [run]:
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "adapter.pt").write_bytes(b"")
    _save_hydra(cfg, run)
    return run


def test_multi_member_and_chained_base_runs_fail_with_one_line(tmp_path):
    ens = _fake_run(tmp_path, "ens", "method=ensemble", "method.num_models=2", members=2)
    with pytest.raises(UqloraError, match="has 2 members .*not supported") as e:
        train(_cfg(tmp_path, "t", *TINY, "method=temperature", f"method.map_run={ens}"))
    assert "\n" not in str(e.value)
    chained = _fake_run(tmp_path, "tt", "method=temperature", f"method.map_run={ens}")
    with pytest.raises(UqloraError, match="is itself temperature of"):
        train(_cfg(tmp_path, "t2", *TINY, "method=temperature", f"method.map_run={chained}"))
    with pytest.raises(UqloraError, match="not a run directory"):
        train(_cfg(tmp_path, "t3", *TINY, "method=temperature", f"method.map_run={tmp_path / 'nosuch'}"))


def test_empty_calib_split_fails_before_training(tmp_path):
    with pytest.raises(UqloraError, match="split 'calib' has no examples"):
        train(_cfg(tmp_path, "x", *TINY, "method=temperature", "data.calib_size=0"))


def test_config_defaults_compose():
    from conftest import compose

    cfg = compose(["method=temperature"])
    assert OmegaConf.to_container(cfg.method, enum_to_str=True) == {"name": "temperature", "display_name": "Temperature",
                                                  "map_run": None, "adapter": None, "split": "calib",
                                                  "max_iter": 100}
