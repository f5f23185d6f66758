"""SWAG: moments and draws against brute force in float64; the SWAG phase across a kill + resume;
MultiSWAG / ensembles pooled in one process and from run directories; MC dropout."""
import json
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import compose
from uqlora.callbacks.swag import SWAGCallback
from uqlora.core.swag import SWAG, assign, flatten
from uqlora.errors import UqloraError
from uqlora.context import RunContext
from uqlora.tasks import evaluate_run, train


def _snapshots(n=7, P=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, P, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, P, dtype=torch.float64) + 3


def _collect(thetas, K):
    s = SWAG(thetas.shape[1], max_rank=K, dtype=torch.float64)
    for t in thetas:
        s.collect(t)
    return s


def test_moments_equal_empirical_mean_and_variance():
    thetas = _snapshots()
    s = _collect(thetas, K=4)
    assert s.n == 7
    torch.testing.assert_close(s.mean, thetas.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.variance(), thetas.var(0, unbiased=False), rtol=0, atol=1e-12)


def test_deviation_matrix_is_the_last_K_stacked_deviations():
    thetas = _snapshots()
    s = _collect(thetas, K=4)
    running = torch.stack([thetas[: i + 1].mean(0) for i in range(len(thetas))])
    expect = (thetas - running)[-4:]  # deviation from the running mean right after adding theta_i
    assert s.rank == 4
    torch.testing.assert_close(s.dev, expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("diag_only,scale", [(False, 1.0), (True, 1.0), (False, 0.5)])
def test_sample_covariance_matches_swag_covariance(diag_only, scale):
    thetas = _snapshots(n=6, P=5)
    s = _collect(thetas, K=5)
    D = s.dev
    target = torch.diag(s.variance()) if diag_only else 0.5 * (torch.diag(s.variance()) + D.T @ D / (D.shape[0] - 1))
    target = scale * target
    torch.testing.assert_close(s.covariance(scale, diag_only=diag_only), target)
    g = torch.Generator().manual_seed(1)
    N = 40_000
    draws = torch.stack([s.sample(scale, generator=g, diag_only=diag_only) for _ in range(N)])
    emp_mean, emp_cov = draws.mean(0), torch.cov(draws.T)
    # Monte-Carlo error of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / N)
    sd = torch.sqrt((torch.outer(target.diagonal(), target.diagonal()) + target ** 2) / N)
    assert torch.all((emp_cov - target).abs() < 5 * sd), (emp_cov - target) / sd
    assert torch.all((emp_mean - s.mean).abs() < 5 * torch.sqrt(target.diagonal() / N))


@pytest.mark.parametrize("preset", ["swag_lora", "multiswag_lora"])
def test_swag_lora_preset_draws_have_the_reference_covariance(preset):
    """The SWAG-LoRA reference (fortuinlab/swag-lora: SWAG.collect_model / sample_fullrank, evaluated by
    scripts/evaluate_swag.bash at SWAG_SAMPLE_SCALE=1.0 with swag_cov_mat=True) draws
    w = mean + sqrt(scale) * (sqrt(var) * z1 + D^T z2 / sqrt(K_max - 1)), without the 1/2 of the SWAG
    covariance. Rebuilt here in float64 from its own moment updates; the preset's draws must have its covariance."""
    scale = float(compose([f"method={preset}"]).method.scale)
    K = 5
    thetas = _snapshots(n=8, P=5, seed=3)
    mean, sq_mean, dev = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), []
    for n, th in enumerate(thetas):   # the reference's collect_model: running moments, deviations from the new mean
        mean = mean * n / (n + 1.0) + th / (n + 1.0)
        sq_mean = sq_mean * n / (n + 1.0) + th ** 2 / (n + 1.0)
        dev = (dev + [th - mean])[-K:]
    D = torch.stack(dev)
    var = (sq_mean - mean ** 2).clamp(min=1e-30)
    g = torch.Generator().manual_seed(5)
    N = 40_000
    z1 = torch.randn(N, 5, generator=g, dtype=torch.float64)
    z2 = torch.randn(N, K, generator=g, dtype=torch.float64)
    ref_draws = mean + 1.0 ** 0.5 * (var.sqrt() * z1 + z2 @ D / (K - 1) ** 0.5)
    ref_cov = torch.diag(var) + D.T @ D / (K - 1)
    sd = torch.sqrt((torch.outer(ref_cov.diagonal(), ref_cov.diagonal()) + ref_cov ** 2) / N)
    assert torch.all((torch.cov(ref_draws.T) - ref_cov).abs() < 5 * sd)       # the formula has that covariance
    s = _collect(thetas, K=K)
    torch.testing.assert_close(s.covariance(scale), ref_cov, rtol=1e-12, atol=1e-14)
    ours = torch.stack([s.sample(scale, generator=g) for _ in range(N)])
    assert torch.all((torch.cov(ours.T) - ref_cov).abs() < 5 * sd), (torch.cov(ours.T) - ref_cov) / sd


def test_fewer_than_two_deviations_falls_back_to_diagonal_with_warning():
    s = _collect(_snapshots(n=1), K=5)
    with pytest.warns(UserWarning, match="diagonal only"):
        x = s.sample(1.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (6,) and torch.isfinite(x).all()


def test_state_dict_roundtrip_and_ring_buffer():
    s = _collect(_snapshots(n=9), K=3)
    assert s.rank == 3
    t = SWAG(6, max_rank=3, dtype=torch.float64)
    t.load_state_dict(s.state_dict())
    for a, b in zip(s.state_dict().values(), t.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="K"):
        SWAG(6, max_rank=1)


def test_assign_and_flatten_roundtrip():
    ps = [torch.zeros(2, 3), torch.zeros(4)]
    v = torch.arange(10, dtype=torch.float64)
    assign(ps, v)
    assert torch.equal(flatten(ps).double(), v)


NO_DROPOUT = ["model.lora.dropout=0.0", "model.head_dropout=0.0", "+model.config.hidden_dropout_prob=0.0",
              "+model.config.attention_probs_dropout_prob=0.0"]
SWAG_RUN = ["model=tiny_bert", "method=swag", "method.unit=epoch", "method.start=1", "method.collect_every=1",
            "method.dtype=float64", "method.num_samples=4", "trainer.max_epochs=5", "trainer.max_steps=-1",
            "data.max_train_samples=32", "data.batch_size=8", "data.max_test_samples=32", "optim.lr=5e-3",
            *NO_DROPOUT]


def _cfg(tmp, name, *overrides):
    cfg = compose(["debug=fast", "logger=none", "progress_bar=none", "print_table=false", *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp / name)
    return cfg


class Killed(Exception):
    pass


def test_resumed_swag_run_ends_with_identical_moments(tmp_path, monkeypatch):
    full_m, full = train(_cfg(tmp_path, "full", *SWAG_RUN))
    assert full["method"].swag.n == 4

    orig = SWAGCallback.on_train_epoch_start

    def die_after_two_snapshots(self, trainer, pl_module):
        if self.swag.n == 2:
            raise Killed()
        return orig(self, trainer, pl_module)

    monkeypatch.setattr(SWAGCallback, "on_train_epoch_start", die_after_two_snapshots)
    with pytest.raises(Killed):
        train(_cfg(tmp_path, "killed", *SWAG_RUN))
    monkeypatch.undo()
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["callbacks"]["SWAGCallback"]["swag"]["n"] == 2
    res_m, resumed = train(_cfg(tmp_path, "resumed", *SWAG_RUN, f"train.ckpt_path={last}"))
    a = torch.load(tmp_path / "full" / "checkpoints" / "method_state.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "method_state.pt", weights_only=True)
    assert int(b["n"]) == 4
    for k in ("mean", "sq_mean", "dev"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)
    assert res_m["test"]["nll"] == pytest.approx(full_m["test"]["nll"], abs=1e-9)


def _save_hydra(cfg, run_dir):
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")


def _eval(tmp_path, run_dir, ensemble=None, *overrides):
    ecfg = compose([f"run_dir={run_dir}", *overrides], config_name="eval")
    with open_dict(ecfg):
        ecfg.print_table = False
        ecfg.ensemble = [str(d) for d in ensemble] if ensemble else None
    out = tmp_path / f"eval_{len(list(tmp_path.glob('eval_*')))}"
    return evaluate_run(ecfg, RunContext(out))[0], out


def test_swag_eval_reproduces_and_multiswag_pools_members(tmp_path):
    cfg = _cfg(tmp_path, "swag0", "model=tiny_bert", "method=swag", "method.collect_every=2",
               "trainer.max_steps=12", "method.num_samples=3", "data.max_test_samples=24")
    m0, objs = train(cfg)
    d0 = objs["run_dir"]
    _save_hydra(cfg, d0)
    again, _ = _eval(tmp_path, d0)  # from the saved SWAG state, no training
    for k in ("acc", "nll", "ece", "brier"):
        assert again["test"][k] == pytest.approx(m0["test"][k], abs=1e-9)
    s0 = np.load(d0 / "predictions" / "test.npz")
    assert s0["samples"].shape == (3, 24, 2)
    np.testing.assert_allclose(s0["probs"], s0["samples"].mean(0), atol=1e-6)
    cfg = _cfg(tmp_path, "multi", "model=tiny_bert", "method=multiswag", "method.num_models=2",
               "method.collect_every=2", "trainer.max_steps=12", "method.num_samples=3", "data.max_test_samples=24")
    mm, objs = train(cfg)
    _save_hydra(cfg, objs["run_dir"])
    pm = np.load(objs["run_dir"] / "predictions" / "test.npz")
    assert pm["samples"].shape == (6, 24, 2)
    assert sorted(p.name for p in (objs["run_dir"] / "members").iterdir()) == ["0", "1"]
    np.testing.assert_allclose(pm["samples"][:3], s0["samples"], atol=1e-6)  # member 0 = the seed-0 SWAG run
    assert not np.allclose(pm["samples"][3:], s0["samples"], atol=1e-4)    # member 1 is another function
    m_dirs, _ = _eval(tmp_path, objs["run_dir"])  # eval.py reloads both members and pools them again
    for k in ("acc", "nll"):
        assert m_dirs["test"][k] == pytest.approx(mm["test"][k], abs=1e-9)
    # MultiSWAG from separate SWAG runs: the models re-run, or their saved predictions pooled -- the same pool
    cfg = _cfg(tmp_path, "swag1", "model=tiny_bert", "method=swag", "method.collect_every=2", "trainer.max_steps=12",
               "method.num_samples=3", "data.max_test_samples=24", "train.init_seed=1")
    _, objs1 = train(cfg)
    _save_hydra(cfg, objs1["run_dir"])
    runs = [d0, objs1["run_dir"]]
    rerun, out_r = _eval(tmp_path, d0, runs)
    saved, out_s = _eval(tmp_path, d0, runs, "from_predictions=true")
    for k in ("acc", "nll", "ece", "brier", "aurc"):
        assert saved["test"][k] == pytest.approx(rerun["test"][k], abs=1e-9)
    pr, ps = (np.load(o / "predictions" / "test.npz") for o in (out_r, out_s))
    np.testing.assert_allclose(ps["samples"], pr["samples"], atol=1e-6)
    np.testing.assert_allclose(ps["samples"][3:], np.load(runs[1] / "predictions" / "test.npz")["samples"], atol=0)
    res = json.loads((out_s / "results.json").read_text())
    assert (res["method"], res["num_models"], res["from_predictions"]) == ("multiswag", 2, True)
    assert "predict_test_0" in json.loads((out_r / "results.json").read_text())["timings"]
    assert not any(k.startswith("predict") for k in res["timings"])  # no model was run
    # a multi-member source counts its members: the 2-member MultiSWAG run + one SWAG run pool 3 models' 9 draws
    _, out3 = _eval(tmp_path, d0, [objs["run_dir"], runs[1]], "from_predictions=true")
    assert np.load(out3 / "predictions" / "test.npz")["samples"].shape == (9, 24, 2)
    assert json.loads((out3 / "results.json").read_text())["num_models"] == 3
    with pytest.raises(UqloraError, match="from_predictions=true pools the runs' saved predictions on their own "
                                          "data; ood=arc_c"):
        _eval(tmp_path, d0, runs, "from_predictions=true", "ood=arc_c")
    with pytest.raises(UqloraError, match=r"saved no predictions for split\(s\) val \(saved: test\); pool it with "
                                          r"from_predictions=false"):
        _eval(tmp_path, d0, runs, "from_predictions=true", "eval.splits=[test,val]")


def test_ensemble_from_run_directories_equals_mean_of_members(tmp_path):
    dirs = []
    for i in range(2):  # a multirun of seeded members: same data splits (seed), different init (train.init_seed)
        cfg = _cfg(tmp_path, f"map{i}", "model=tiny_bert", "trainer.max_steps=6", "data.max_test_samples=24",
                   f"train.init_seed={i}")
        _, objs = train(cfg)
        _save_hydra(cfg, objs["run_dir"])
        dirs.append(objs["run_dir"])
    m, out = _eval(tmp_path, dirs[0], ensemble=dirs)
    p = [np.load(d / "predictions" / "test.npz")["probs"] for d in dirs]
    comb = np.load(out / "predictions" / "test.npz")
    assert not np.allclose(p[0], p[1], atol=1e-4)  # the init seed made two different members
    np.testing.assert_allclose(comb["probs"], (p[0] + p[1]) / 2, atol=1e-6)
    assert comb["samples"].shape == (2, 24, 2)
    res = json.loads((out / "results.json").read_text())
    assert res["num_models"] == 2
    # recorded as an ensemble: the tables put the pool in an Ensemble row, not as one more MAP run of the cell
    assert (res["method"], res["method_label"], res["config"]["method"]["display_name"]) == ("ensemble", "ensemble",
                                                                                              "Ensemble")
    assert res["config"]["method"]["num_models"] == 2
    from uqlora.results.collect import read_run

    assert (read_run(out).method, read_run(out).base, read_run(dirs[0]).method) == ("ensemble", "ensemble", "map")


def test_pooled_runs_are_recorded_as_the_multi_member_method():
    from uqlora.sources import pooled_method

    for opt, label, want in (("swag", "swag", ("multiswag", "multiswag", "MultiSWAG")),
                             ("swag_lora", "swag_lora", ("multiswag", "multiswag_lora", "MultiSWAG")),
                             ("laplace", "laplace", ("laplace", "laplace_pooled", "Laplace-LoRA (pooled runs)"))):
        cfg = compose(["model=tiny_bert", f"method={opt}"])
        out, got = pooled_method(cfg, label, 3)
        assert (out.method.name, got, out.method.display_name) == want
        assert cfg.method.name == opt.replace("_lora", "")  # the members' config is left as it was
    assert pooled_method(compose(["model=tiny_bert", "method=swag"]), "swag", 4)[0].method.num_models == 4


def test_mc_dropout_samples_vary_and_need_dropout(tmp_path):
    m, objs = train(_cfg(tmp_path, "mcd", "model=tiny_bert", "method=mc_dropout", "method.num_samples=5",
                         "trainer.max_steps=4", "data.max_test_samples=16", "model.lora.dropout=0.3"))
    p = np.load(objs["run_dir"] / "predictions" / "test.npz")
    assert p["samples"].shape == (5, 16, 2)
    assert p["samples"].std(0).max() > 1e-4
    with pytest.raises(UqloraError, match="dropout"):
        train(_cfg(tmp_path, "mcd0", "model=tiny_bert", "method=mc_dropout", "trainer.max_steps=2",
                   *NO_DROPOUT))


@pytest.mark.parametrize("model,data,extra", [
    ("minilm", "sst2", ["trainer.max_steps=40", "trainer.max_epochs=2", "method.collect_every=4",
                        "data.max_test_samples=96"]),
    ("smollm2_135m", "arc_e", ["trainer.max_steps=6", "method.collect_every=1", "data.max_test_samples=12",
                               "data.batch_size=2", "data.max_val_samples=4", "data.eval_batch_size=4"]),
])
def test_real_model_swag_run_and_eval_reproduces(tmp_path, model, data, extra):
    cfg = _cfg(tmp_path, "run", f"model={model}", f"data={data}", "method=swag", "method.num_samples=3", *extra)
    m, objs = train(cfg)
    run_dir = objs["run_dir"]
    _save_hydra(cfg, run_dir)
    state = torch.load(run_dir / "checkpoints" / "method_state.pt", weights_only=True)
    assert int(state["n"]) >= 3 and state["dev"].shape[0] == min(int(state["n"]), 5)
    assert np.load(run_dir / "predictions" / "test.npz")["samples"].shape[0] == 3
    again, _ = _eval(tmp_path, run_dir)
    for k in ("acc", "nll", "ece", "brier"):
        assert again["test"][k] == pytest.approx(m["test"][k], abs=1e-6)
