"""BLoB and TFB (and, through SAMPLED, every Gaussian-LoRA method registered, e.g. ScalaBL): known answers in float64 on a tiny peft LoRA net (flipout moments, weight draws, KLs,
the KL schedule, TFB's reparameterisation and search), a toy problem with a known posterior, and end to end
runs (tiny models; MiniLM and SmolLM2 subsampled) whose saved state eval.py reloads to identical predictions."""
import logging
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn

from conftest import compose
from uqlora.core.blob import BLoB, flipout, gaussian_kl, kl_cycle_length, kl_weight, lora_layers
from uqlora.core.tfb import TFB, search_sigma, svd_reparameterise
from uqlora.errors import UqloraError
from uqlora.methods import METHODS, discover
from uqlora.methods.blob import SampledLoRA

discover()
# every registered method with a Gaussian over the LoRA weights (BLoB, TFB and any added later: ScalaBL)
SAMPLED = sorted(n for n, cls in METHODS.items() if issubclass(cls, SampledLoRA))


class Net(nn.Module):
    def __init__(self, d_in=6, d_hidden=5, d_out=3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_lora(seed=0, r=2, **kw):
    """A float64 two-layer net with LoRA (r, alpha = 2r) on both layers and random (non-zero) B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(Net(**kw), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc1", "fc2"],
                                                 lora_dropout=0.0)).double()
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.5)
    return model


def _z(est, expected, se):
    return ((est - expected).abs() / se.clamp_min(1e-300)).max().item()


def _moments(outs: torch.Tensor):
    """Sample mean, covariance and their standard errors of outs [n, T, k] (per token t, and token 0 x token 1)."""
    n = outs.shape[0]
    mean = outs.mean(0)
    c = outs - mean
    prod = torch.einsum("nti,ntj->ntij", c, c)           # per-token products
    cross = torch.einsum("ni,nj->nij", c[:, 0], c[:, 1])  # token 0 x token 1
    return (mean, outs.std(0) / math.sqrt(n), prod.mean(0), prod.std(0) / math.sqrt(n), cross.mean(0),
            cross.std(0) / math.sqrt(n))


# --- flipout and weight draws --------------------------------------------------------------------------------
def test_blob_flipout_has_the_mean_and_covariance_implied_by_sigma():
    model = tiny_lora()
    name, layer = lora_layers(model)[0]
    var = BLoB([(name, layer)], eps=0.3, beta=0.2)
    with torch.no_grad():
        var.rho[0].uniform_(0.2, 0.6)  # sigma = rho^2 in [0.04, 0.36]: visible noise
    x = torch.randn(2, 6, dtype=torch.float64)  # two tokens of one sequence
    layer.eval()
    with torch.no_grad():
        mean_out = layer(x)
    layer.train()
    torch.manual_seed(1)
    with torch.no_grad():
        outs = torch.stack([layer(x) for _ in range(20000)])
    mean, se_mean, cov, se_cov, cross, se_cross = _moments(outs)
    B, s, sig2 = layer.lora_B["default"].weight, layer.scaling["default"], var.rho[0].detach() ** 4  # sigma = rho^2
    expected = torch.stack([s ** 2 * B @ torch.diag(sig2 @ x[t] ** 2) @ B.T for t in range(2)])
    assert _z(mean, mean_out, se_mean) < 5
    assert _z(cov, expected, se_cov) < 5
    assert _z(cross, torch.zeros_like(cross), se_cross) < 5  # flipout: two tokens' weights are uncorrelated
    assert (expected.diagonal(dim1=1, dim2=2) > 20 * se_cov.diagonal(dim1=1, dim2=2)).all()  # the test is not vacuous


def test_flipout_signs_decorrelate_tokens_and_keep_the_law():
    torch.manual_seed(0)
    W = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    outs = torch.stack([flipout(x, W) for _ in range(20000)])
    # with a fixed W the signs alone make each output a symmetric variable with E[z^2] = sum_j W_ij^2 x_j^2
    _, _, cov, se_cov, cross, se_cross = _moments(outs)
    assert _z(torch.stack([cov[t].diagonal() for t in range(2)]), (x ** 2) @ (W ** 2).T,
              torch.stack([se_cov[t].diagonal() for t in range(2)])) < 5
    assert _z(cross, torch.zeros_like(cross), se_cross) < 5


def test_weight_draws_are_exact_weight_samples_shared_across_calls():
    model = tiny_lora()
    layers = lora_layers(model)
    var = BLoB(layers, eps=0.3)
    model.eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    draws = var.draws(3, seed=7)
    assert all(torch.equal(a, b) for d1, d2 in zip(draws, var.draws(3, seed=7)) for a, b in zip(d1, d2))
    with torch.no_grad(), var.use_draw(draws[1]):
        got = model(x)
        again = torch.cat([model(x[:2]), model(x[2:])])  # the same function on every batch
    # by hand: A_s = A + sigma * E_s in both layers
    h = x
    for i, (_, layer) in enumerate(layers):
        A = layer.lora_A["default"].weight + var.rho[i].detach() ** 2 * draws[1][i]
        h = layer.base_layer(h) + h @ A.T @ layer.lora_B["default"].weight.T * layer.scaling["default"]
        if i == 0:
            h = torch.tanh(h)
    torch.testing.assert_close(got, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.base_model.model.fc2(torch.tanh(model.base_model.model.fc1(x))))
    var.remove()
    with torch.no_grad(), var.use_draw(draws[1]):
        plain = model(x)
    assert not torch.allclose(plain, got)


# --- KL divergences and the KL schedule ------------------------------------------------------------------------
def test_blob_kl_equals_the_closed_form_and_a_monte_carlo_estimate():
    model = tiny_lora()
    var = BLoB(lora_layers(model), eps=0.3, beta=0.2)
    mus = [var.lora_A(i).weight.detach() for i in range(2)]
    sds = [var.rho[i].detach() ** 2 for i in range(2)]
    closed = sum(((torch.log(0.2 / s) + (s ** 2 + m ** 2) / (2 * 0.2 ** 2) - 0.5).sum() for m, s in zip(mus, sds)))
    torch.testing.assert_close(var.kl().detach(), closed, rtol=1e-12, atol=0)
    torch.manual_seed(0)
    mc = []
    for m, s in zip(mus, sds):  # E_q[log q(w) - log p(w)] from 200k draws per element
        w = m + s * torch.randn(200_000, *m.shape, dtype=torch.float64)
        q = torch.distributions.Normal(m, s)
        p = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64))
        mc.append((q.log_prob(w) - p.log_prob(w)).sum((1, 2)))
    mc = sum(mc)
    assert abs(mc.mean() - closed) < 5 * mc.std() / math.sqrt(mc.numel())


def test_gaussian_kl_is_kl_q_to_p_as_torch_distributions():
    mu, sd = torch.randn(7, dtype=torch.float64), torch.rand(7, dtype=torch.float64) + 0.1
    Normal = torch.distributions.Normal
    want = torch.distributions.kl_divergence(Normal(mu, sd), Normal(torch.tensor(0.3, dtype=torch.float64),
                                                                  torch.tensor(1.7, dtype=torch.float64))).sum()
    torch.testing.assert_close(gaussian_kl(mu, sd, 0.3, 1.7), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("M", [1, 2, 5, 37])
def test_kl_weight_equals_the_formula(M):
    for step in range(3 * M):
        i = step % M + 1
        want = Fraction(2 ** i, 2 ** (M + 1) - 1)
        assert kl_weight(step, M) == pytest.approx(float(want), rel=1e-13)
    assert kl_weight(0, M, reweighting=False) == 1.0 / M


@pytest.mark.parametrize("M", [3, 50, 900, 1500])
def test_kl_weights_of_one_cycle_sum_to_the_closed_form(M):
    weights = [kl_weight(step, M) for step in range(M)]
    assert all(math.isfinite(w) and w >= 0 for w in weights)
    want = Fraction(2 ** (M + 1) - 2, 2 ** (M + 1) - 1)
    assert math.fsum(weights) == pytest.approx(float(want), rel=1e-13, abs=0)
    assert weights[-1] == pytest.approx(float(Fraction(2 ** M, 2 ** (M + 1) - 1)), rel=1e-13)  # ~ 1/2
    assert kl_weight(M, M) == weights[0]  # the cycle restarts


def test_kl_cycle_length_is_blobs_dataset_rescaling():
    # BoolQ (9427 training questions), one GPU, batch 4, gamma 8 -> M = 909 (the official formula)
    assert kl_cycle_length(9427, 4, 8.0) == int(100 * 9427 ** (math.pi / 8) / 4) == 909
    assert kl_cycle_length(2251, 8, 8.0) == int(100 * 2251 ** (math.pi / 8) / 8)
    assert kl_cycle_length(1, 10 ** 6) == 1


# --- TFB ---------------------------------------------------------------------------------------------------------
def test_tfb_reparameterisation_keeps_the_product_and_sigma_zero_is_the_map_model():
    model = tiny_lora()
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    layers = lora_layers(model)
    for _, layer in layers:
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        A2, B2, d, V = svd_reparameterise(A, B)
        torch.testing.assert_close(B2 @ A2, B @ A, rtol=1e-12, atol=1e-13)
    var = TFB(layers)
    model.eval()
    draws = var.draws(2, seed=0)
    with torch.no_grad(), var.use_draw(draws[0]):
        at_zero = model(x)
    torch.testing.assert_close(at_zero, want, rtol=0, atol=0)  # bit for bit: no noise at sigma = 0
    # sigma > 0: the rotated noise is the in-place reparameterised adapter B'(A' + diag(sigma / d) E)
    var.sigma = 0.05
    with torch.no_grad(), var.use_draw(draws[1]):
        noisy = model(x)
    ref = tiny_lora()
    with torch.no_grad():
        for i, (_, layer) in enumerate(lora_layers(ref)):
            A2, B2, d, _ = svd_reparameterise(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
            layer.lora_A["default"].weight.copy_(A2 + (0.05 / d).unsqueeze(1) * draws[1][i])
            layer.lora_B["default"].weight.copy_(B2)
        torch.testing.assert_close(noisy, ref(x), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(noisy, want)


def test_tfb_guards_zero_singular_values():
    model = tiny_lora()
    (name, layer), _ = lora_layers(model)
    with torch.no_grad():
        layer.lora_B["default"].weight[:, 1] = 0.0  # a rank-deficient B: d_2 = 0
    var = TFB(lora_layers(model))
    var.sigma = 0.1
    assert var.d(0)[1] < 1e-12 and var.row_std(0)[1] == 0 and torch.isfinite(var.row_std(0)).all()
    # the product perturbation is sigma * U E on the nonzero directions: B dA = sigma * u_1 e_1
    e = torch.randn(2, 6, dtype=torch.float64)
    U, d, Vh = torch.linalg.svd(layer.lora_B["default"].weight.detach())
    torch.testing.assert_close(layer.lora_B["default"].weight.detach() @ var.perturbation(0, e),
                               0.1 * U[:, :1] @ e[:1], rtol=1e-10, atol=1e-12)


def _official_search(change, low, high, iters, tol, n_anchor=1):
    """bayesian-peft's tfblora.fit: ratio / n_anchor > tol -> best = high = mid, else low = mid; returns best."""
    best = high
    for _ in range(iters):
        mid = (low + high) / 2
        if change(mid) / n_anchor > tol:
            best = high = mid
        else:
            low = mid
    return best


@pytest.mark.parametrize("tol", [0.003, 0.01, 0.05])
def test_tfb_search_returns_the_largest_sigma_within_tolerance(tol):
    curve = lambda s: (s / 0.05) ** 2 * 0.01  # noqa: E731 -- a monotone relative change; within tol iff s <= s_star
    s_star = 0.05 * math.sqrt(tol / 0.01)
    sigma, hist = search_sigma(curve, 0.001, 0.2, 8, tol)
    assert curve(sigma) <= tol and sigma <= s_star
    assert s_star - sigma <= (0.2 - 0.001) / 2 ** 8 + 1e-15
    assert hist[0][0] == 0.2 and len(hist) == 9
    official = _official_search(curve, 0.001, 0.2, 8, tol)
    assert curve(official) > tol  # the official rule returns a sigma that violates the tolerance
    # ... and with the division by the anchor size (500) nothing violates: the never-evaluated upper bound
    assert _official_search(curve, 0.001, 0.015, 5, tol, n_anchor=500) == 0.015


def test_tfb_search_edges(caplog):
    assert search_sigma(lambda s: 0.0, 0.001, 0.2, 5, 0.003) == (0.2, [(0.2, 0.0)])  # the upper bound is fine
    with caplog.at_level("WARNING"):
        sigma, hist = search_sigma(lambda s: 1.0, 0.001, 0.2, 3, 0.003)
    assert sigma == 0.001 and hist[-1] == (0.001, 1.0) and "even sigma" in caplog.text
    with pytest.raises(UqloraError, match="0 < low < high"):
        search_sigma(lambda s: 0.0, 0.2, 0.1, 5, 0.003)


# --- BLoB on a toy problem with a known posterior -----------------------------------------------------------------
class _ToyBackbone(nn.Module):
    """y = (0 + B A) x: LoRA on a zero linear map; the inputs' last two features are always 0, so the likelihood
    does not depend on A's last two columns: their posterior is the prior N(0, beta^2)."""

    head_kind = "classifier"

    def __init__(self):
        from peft import LoraConfig, get_peft_model

        super().__init__()
        lin = nn.Sequential(nn.Linear(4, 3, bias=False))
        self.transformer = get_peft_model(lin, LoraConfig(r=2, lora_alpha=2, target_modules=["0"], lora_dropout=0.0))
        (_, layer), = lora_layers(self.transformer)
        with torch.no_grad():
            layer.base_layer.weight.zero_()
            layer.lora_B["default"].weight.normal_()

    def logits(self, batch):
        return self.transformer(batch["x"])


def _toy_blob(rho_update: str, steps: int = 150):
    import lightning.pytorch as pl

    from uqlora.methods.blob import BLoBMethod, BlobConfig

    torch.manual_seed(0)
    cfg = OmegaConf.create({
        "method": OmegaConf.structured(BlobConfig(kl_cycle=10, rho_update=rho_update)), "loss": {},
        "optim": {"lr": 0.01, "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "constant", "eps": 1e-8},
        "model": {"precision": "32-true"}, "trainer": {"accelerator": "cpu"}, "data": {"batch_size": 32},
        "progress_bar": "none"})
    method = BLoBMethod(_ToyBackbone(), cfg)
    A0 = method.var.lora_A(0).weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(512, 4)
    x[:, :2] = 3 * torch.randn(512, 2, generator=g)
    y = (x[:, :2] @ torch.randn(3, 2, generator=g).T).argmax(1)
    data = [{"x": x[i:i + 32], "labels": y[i:i + 32]} for i in range(0, 512, 32)]
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(method, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return method, A0


@pytest.mark.parametrize("rho_update", ["sgd", "adamw"])
def test_blob_on_a_toy_problem_moves_the_variance_to_the_known_posterior(rho_update):
    method, A0 = _toy_blob(rho_update)
    sigma, A = method.var.std(0).detach(), method.var.lora_A(0).weight.detach()
    beta = 0.2
    assert sigma.max() <= beta + 1e-4
    # the columns no datum informs: posterior = prior, so sigma goes from ~0.002 up to beta and the mean to 0
    torch.testing.assert_close(sigma[:, 2:], torch.full_like(sigma[:, 2:], beta), rtol=0.01, atol=0)
    assert A[:, 2:].abs().max() < 0.05 * A0[:, 2:].abs().max()
    # the informed columns: the likelihood keeps the variance below the prior's
    assert sigma[:, :2].max() < 0.9 * beta
    assert method.cycle == 10
    if rho_update == "sgd":  # rho's NLL gradient was used by the SGD step and cleared
        assert method.var.rho[0].grad is None


# --- end to end -----------------------------------------------------------------------------------------------------
FAST = ["debug=fast", "logger=none", "progress_bar=none", "print_table=false"]


def _cfg(tmp, name, *overrides):
    cfg = compose([*FAST, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp / name)
    return cfg


def _run(tmp, name, *overrides):
    from uqlora.tasks import train

    cfg = _cfg(tmp, name, *overrides)
    metrics, objs = train(cfg)
    (objs["run_dir"] / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, objs["run_dir"] / ".hydra" / "config.yaml")
    return metrics, objs


def _eval(tmp, run_dir):
    from uqlora.context import RunContext
    from uqlora.tasks import evaluate_run

    ecfg = compose([f"run_dir={run_dir}"], config_name="eval")
    with open_dict(ecfg):
        ecfg.print_table = False
    out = tmp / f"eval_{len(list(tmp.glob('eval_*')))}"
    return evaluate_run(ecfg, RunContext(out))[0], out


def _preds(d):
    return np.load(d / "predictions" / "test.npz")


def _check_sampled_run(tmp, run_dir, S, C):
    p = _preds(run_dir)
    n = len(p["labels"])
    assert p["samples"].shape == (S, n, C)
    np.testing.assert_allclose(p["probs"], p["samples"].mean(0), atol=1e-6)
    assert p["samples"].std(0).max() > 0  # S distinct functions (a tiny random cloze model is nearly flat)
    _, out = _eval(tmp, run_dir)  # eval.py: the saved adapter + method state, no training, no search
    q = _preds(out)
    np.testing.assert_array_equal(q["samples"], p["samples"])
    np.testing.assert_array_equal(q["probs"], p["probs"])


HEADS = {  # head -> (overrides, number of classes)
    "classifier": (["model=tiny_bert", "data=sst2"], 2),
    "mc_classifier": (["model=tiny_bert", "data=arc_e"], 5),
    "lm_choices": (["model=tiny_llama", "data=sst2"], 2),
    "lm_cloze": (["model=tiny_llama", "data=arc_e"], 5),
}
TINY = ["trainer.max_steps=6", "data.max_train_samples=48", "data.max_val_samples=8", "data.max_test_samples=12",
        "data.batch_size=4", "method.num_samples=3"]


@pytest.mark.parametrize("head", ["classifier", "lm_choices", "lm_cloze"])
def test_sampled_lora_methods_on_a_map_run_end_to_end(tmp_path, head):
    over, C = HEADS[head]
    _, m = _run(tmp_path, "map", *over, *TINY[:-1])
    assert m["method"].backbone.head_kind == head
    map_dir = m["run_dir"]
    for method in SAMPLED:
        extra = [f"method.map_run={map_dir}", "method.anchor_size=16", "method.search_samples=2"] if method == "tfb" else []
        _, objs = _run(tmp_path, method, *over, *TINY, f"method={method}", *extra)
        run = objs["run_dir"]
        _check_sampled_run(tmp_path, run, 3, C)
        state = torch.load(run / "checkpoints" / "method_state.pt", weights_only=True)
        assert state["method"] == method and len(state["names"]) == 4  # 2 blocks x (q, v)
        res = json.loads((run / "results.json").read_text())
        if method == "tfb":  # the MAP adapter, untouched; a searched sigma
            a = torch.load(map_dir / "checkpoints" / "adapter.pt", weights_only=True)
            b = torch.load(run / "checkpoints" / "adapter.pt", weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            post = res["train"]["posthoc"]
            assert post["searched"] == 1 and 0.001 <= post["sigma"] <= 0.2 and post["n_anchor"] == 16
            assert res["train"]["map_run"] == str(map_dir) and "steps" not in res["train"]
        else:
            assert res["train"]["steps"] == 6 and not res["train"]["restored_best"]


def test_blob_on_the_mc_classifier_head(tmp_path):
    over, C = HEADS["mc_classifier"]
    _, objs = _run(tmp_path, "blob", *over, *TINY, "method=blob")
    assert objs["method"].backbone.head_kind == "mc_classifier"
    _check_sampled_run(tmp_path, objs["run_dir"], 3, C)


class Killed(Exception):
    pass


def test_blob_resumed_after_a_kill_ends_bit_identical(tmp_path, monkeypatch):
    from uqlora.methods.blob import BLoBMethod

    run = ["model=tiny_bert", "method=blob", "method.kl_cycle=3", "method.num_samples=2", "trainer.max_epochs=3",
           "trainer.max_steps=-1", "data.max_train_samples=32", "data.batch_size=8", "data.max_test_samples=16"]
    _run(tmp_path, "full", *run)

    def die(self):
        if self.current_epoch == 2:
            raise Killed()

    monkeypatch.setattr(BLoBMethod, "on_train_epoch_start", die, raising=False)
    with pytest.raises(Killed):
        _run(tmp_path, "killed", *run)
    monkeypatch.undo()
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 1 and any(k.startswith("var.rho.") for k in ckpt["state_dict"])
    _, resumed = _run(tmp_path, "resumed", *run, f"train.ckpt_path={last}")
    a = torch.load(tmp_path / "full" / "checkpoints" / "method_state.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "method_state.pt", weights_only=True)
    assert all(torch.equal(x, y) for x, y in zip(a["rho"], b["rho"]))
    init = (0.05 / math.sqrt(2), 0.05)  # rho ~ U[eps / sqrt 2, eps] at init: training moved it out of that range
    assert not all(((r >= init[0]) & (r <= init[1])).all() for r in a["rho"])
    np.testing.assert_array_equal(_preds(tmp_path / "full")["samples"], _preds(tmp_path / "resumed")["samples"])


def test_num_samples_zero_predicts_with_the_mean(tmp_path, monkeypatch):
    from uqlora.predict import predict

    _, objs = _run(tmp_path, "blob", *HEADS["classifier"][0], *TINY, "method=blob")
    method, dm, trainer = objs["method"], objs["datamodule"], objs["trainer"]
    with open_dict(method.mcfg):
        method.mcfg.num_samples = 0
    mean = predict(trainer, method, dm, "test")
    assert "samples" not in mean and method.num_weight_samples() == 1
    method.var.remove()  # plain LoRA with the trained means
    plain = predict(trainer, method, dm, "test")
    np.testing.assert_array_equal(mean["probs"], plain["probs"])
    # TFB with num_samples=0 is the MAP model
    over = HEADS["lm_choices"][0]
    _, m = _run(tmp_path, "map", *over, *TINY[:-1])
    _, t = _run(tmp_path, "tfb", *over, *TINY, "method=tfb", f"method.map_run={m['run_dir']}", "method.sigma=0.05",
                "method.num_samples=0")
    p, q = _preds(m["run_dir"]), _preds(t["run_dir"])
    assert "samples" not in q and t["results"]["train"]["posthoc"] == {"sigma": 0.05, "searched": 0}
    np.testing.assert_array_equal(p["probs"], q["probs"])


class _Poison(list):
    def _no(self, *a, **k):
        raise AssertionError("the TFB search read a held-out split")

    __iter__ = __getitem__ = __len__ = __bool__ = _no


def test_tfb_search_reads_only_the_training_split(tmp_path, monkeypatch, caplog):
    from uqlora.build import setup

    cfg = _cfg(tmp_path, "tfb", *HEADS["classifier"][0], *TINY, "method=tfb", "method.anchor_size=10",
               "method.search_samples=2", "method.search_iters=3", "method.high=5.0", "data.eval_batch_size=4")
    method, dm = setup(cfg)
    dm.setup()
    train_ids = {r["id"] for r in dm.records["train"]}
    anchor_ids = [r["id"] for b in [method.anchor_loader(dm)] for r in b.dataset]
    assert len(anchor_ids) == 10 and set(anchor_ids) <= train_ids
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for _, layer in lora_layers(method.backbone):
            layer.lora_B["default"].weight.normal_(0, 0.5)
    for split in ("val", "calib", "test", "ood"):
        dm.records[split] = _Poison()
    monkeypatch.setattr("uqlora.progress.QUIET_S", 0.0)
    method.progress_mode = "text"  # as in a log file: progress lines during each searched sigma's pass
    with caplog.at_level(logging.INFO):
        method.posthoc_fit(dm)
    t = method.tuning
    said = [r.getMessage() for r in caplog.records]
    progress = [m for m in said if m.startswith("TFB: sigma ")]
    results = [m for m in said if m.startswith("TFB search ")]
    assert len(results) == len(t["search_sigmas"]) and progress and "(search 1/<=5, 2 draws): " in progress[0]
    assert t["n_anchor"] == 10 and 0.001 <= t["sigma"] < 5.0 and len(t["search_sigmas"]) >= 4
    within = [c <= 0.003 for c in t["search_changes"]]
    assert any(within) and not all(within)  # a real search: both sides of the tolerance were seen
    # the saved state belongs to this adapter only
    state = method.method_state_dict()
    with torch.no_grad():
        lora_layers(method.backbone)[0][1].lora_B["default"].weight.mul_(2)
    with pytest.raises(UqloraError, match="does not belong to this adapter"):
        method.load_method_state_dict(state)


@pytest.mark.parametrize("method,bad,match", [
    ("blob", "method.rho_update=nosuch", "unknown method.rho_update 'nosuch'; valid choices: sgd, adamw"),
    ("blob", "method.beta=0", "method.beta=0.0 is impossible; valid: a finite number > 0"),
    ("blob", "method.kl_cycle=0", "method.kl_cycle=0 is impossible; valid: null or an integer >= 1"),
    ("tfb", "method.anchor_split=test", "unknown method.anchor_split 'test'; valid choices: train, val, calib"),
    ("tfb", "method.criterion=nosuch", "valid choices: nll, acc"),
    ("tfb", "method.low=0.5", "low < high"),
])
def test_bad_bayes_lora_options_fail_in_one_line(tmp_path, method, bad, match):
    from uqlora.overrides import check_overrides
    from uqlora.tasks import train

    with pytest.raises(UqloraError, match=match) as e:
        check_overrides([f"method={method}", bad])  # choices: refused when the config is composed
        train(_cfg(tmp_path, "bad", "model=tiny_bert", f"method={method}", "trainer.max_steps=1", bad))
    assert "\n" not in str(e.value)


# --- real weights (subsampled) ------------------------------------------------------------------------------------
REAL = {  # setup -> (overrides, number of classes, accuracy floor of the pretrained model)
    "minilm_sst2": (["model=minilm", "data=sst2", "trainer.max_steps=10", "data.max_train_samples=32",
                     "data.max_test_samples=32", "data.max_val_samples=8", "optim.lr=3e-3", "optim.warmup_ratio=0"],
                    2, None),
    "smollm2_cloze_arc_e": (["model=smollm2_135m", "data=arc_e", "trainer.max_steps=2", "data.batch_size=2",
                             "data.max_train_samples=8", "data.max_test_samples=8", "data.max_val_samples=2",
                             "data.eval_batch_size=4"], 5, 0.25),
    "smollm2_words_sst2": (["model=smollm2_135m", "data=sst2", "trainer.max_steps=2", "data.batch_size=4",
                            "data.max_train_samples=8", "data.max_test_samples=16", "data.max_val_samples=2"], 2, 0.6),
}
REAL_OPTIONS = {  # a method not listed runs with these (its training is the variational one: a short KL cycle)
    "tfb": ["method.num_samples=2", "method.anchor_size=4", "method.search_samples=2", "method.search_iters=1"],
}
DEFAULT_REAL = ["method.num_samples=2", "method.kl_cycle=2"]


@pytest.fixture(scope="module")
def real_map_runs(tmp_path_factory):
    """One MAP run per real setup, shared by the TFB tests (trained on first use)."""
    runs = {}

    def get(setup):
        if setup not in runs:
            runs[setup] = _run(tmp_path_factory.mktemp(f"map_{setup}"), "map", *REAL[setup][0])[1]["run_dir"]
        return runs[setup]

    return get


@pytest.mark.parametrize("method", SAMPLED)
@pytest.mark.parametrize("setup", sorted(REAL))
def test_real_models_run_the_sampled_lora_methods(tmp_path, real_map_runs, setup, method):
    over, C, floor = REAL[setup]
    extra = [f"method.map_run={real_map_runs(setup)}"] if method == "tfb" else []
    metrics, objs = _run(tmp_path, method, *over, f"method={method}", *REAL_OPTIONS.get(method, DEFAULT_REAL), *extra)
    p = _preds(objs["run_dir"])  # (eval.py's reload is checked on the tiny models above)
    assert p["samples"].shape == (2, len(p["labels"]), C) and np.isfinite(p["samples"]).all()
    np.testing.assert_allclose(p["probs"], p["samples"].mean(0), atol=1e-6)
    if floor is not None:  # the pretrained SmolLM2 already answers well above chance; the Bayesian layers keep it
        assert metrics["test"]["acc"] > floor
    if method == "tfb":
        post = json.loads((objs["run_dir"] / "results.json").read_text())["train"]["posthoc"]
        chosen = dict(zip(post["search_sigmas"], post["search_changes"]))
        assert post["sigma"] == 0.001 or chosen[post["sigma"]] <= 0.003


# --- two processes (DDP, gloo) ------------------------------------------------------------------------------------
def test_tfb_search_stops_a_pass_once_the_change_is_proven_with_the_same_sigma(tmp_path):
    """A sigma's anchor pass ends when the anchors read so far prove the change beyond the tolerance: the same
    decisions and sigma as reading every anchor; the recorded change of a stopped pass is a lower bound."""
    from uqlora.build import setup
    from uqlora.core.tfb import change_lower_bound

    # the bound: the unread anchors add NLL >= 0 (nll) / can all be right (acc)
    assert change_lower_bound("nll", 3.0, 0, 4, 10, 0.25, 1.0) == pytest.approx(0.2)   # 0.30 mean >= 0.25 * 1.2
    assert change_lower_bound("nll", 2.0, 0, 4, 10, 0.25, 1.0) == 0.0                  # 0.20 < 0.25: nothing proven
    assert change_lower_bound("acc", 0.0, 2, 4, 10, 0.25, 1.0) == pytest.approx(0.2)   # at most 8 of 10 right
    assert change_lower_bound("acc", 0.0, 4, 4, 10, 0.25, 1.0) == 0.0
    runs = {}
    for stop in (False, True):
        cfg = _cfg(tmp_path, f"tfb{stop}", *HEADS["classifier"][0], *TINY, "method=tfb", "method.anchor_size=16",
                   "method.search_samples=2", "method.search_iters=3", "method.high=5.0", "data.eval_batch_size=2",
                   "method.criterion=acc", f"method.search_stop_early={str(stop).lower()}")
        method, dm = setup(cfg)
        dm.setup()
        torch.manual_seed(0)
        with torch.no_grad():  # a trained-looking adapter: B != 0
            for _, layer in lora_layers(method.backbone):
                layer.lora_B["default"].weight.normal_(0, 2.0)
        method.posthoc_fit(dm)
        runs[stop] = method.tuning
    full, early = runs[False], runs[True]
    assert full["search_anchors_read"] == [1.0] * len(full["search_sigmas"])
    assert early["sigma"] == full["sigma"] and early["search_sigmas"] == full["search_sigmas"]
    stopped = [i for i, r in enumerate(early["search_anchors_read"]) if r < 1]
    # sigma = 5 flips a pseudo-label within the first 10 of the 16 anchors: proven, the other 6 are not read
    assert stopped and early["search_anchors_read"][0] < 1, early
    for i, (a, b) in enumerate(zip(early["search_changes"], full["search_changes"])):
        if i in stopped:
            assert 0.003 < a <= b + 1e-12  # a lower bound, and beyond the tolerance like the full pass
        else:
            assert a == pytest.approx(b, rel=1e-12)


def test_ddp_counts_the_kl_once_and_finds_the_same_tfb_sigma(tmp_path):
    """BLoB with the NLL step switched off (B ~ 0, AdamW lr 1e-12): A and rho move by the KL's SGD step alone,
    which 2 processes apply once per step, as one process does. TFB on a MAP run: each process scores its
    shard of the anchors, the sums are gathered: the same search, sigma and predictions as one process."""
    from test_distributed import DDP, RUN, _ddp_run

    blob = [*RUN, "method=blob", "method.rho_update=adamw", "optim.lr=1e-12", "method.kllr=0.05",
            "method.kl_cycle=2", "method.num_samples=2"]
    _run(tmp_path, "blob1", *blob, "data.batch_size=32")
    _ddp_run(tmp_path / "blob2", *blob, "data.batch_size=16", *DDP)
    s1, s2 = (torch.load(tmp_path / d / "checkpoints" / "method_state.pt", weights_only=True)
              for d in ("blob1", "blob2"))
    for a, b in zip(s1["rho"], s2["rho"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert a.max() > 0.06  # moved well beyond its initial range [0.035, 0.05]
    map_dir = _run(tmp_path, "map", *RUN, "data.batch_size=32")[1]["run_dir"]
    tfb = [*RUN, "method=tfb", f"method.map_run={map_dir}", "method.anchor_size=16", "method.search_samples=2",
           "method.num_samples=2", "data.eval_batch_size=8"]
    _run(tmp_path, "tfb1", *tfb, "data.batch_size=32")
    _ddp_run(tmp_path / "tfb2", *tfb, "data.batch_size=16", *DDP)
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text())["train"]["posthoc"] for d in ("tfb1", "tfb2"))
    assert r2["n_anchor"] == r1["n_anchor"] == 16 and r2["sigma"] == r1["sigma"]
    assert r2["search_sigmas"] == r1["search_sigmas"]
    np.testing.assert_allclose(r2["search_changes"], r1["search_changes"], rtol=1e-9)
    # each process groups its own shard by length, so its test batches are padded to other lengths than the single
    # process's: float32 attention over other pad lengths differs in the last digits (~1e-5), not more
    np.testing.assert_allclose(_preds(tmp_path / "tfb2")["samples"], _preds(tmp_path / "tfb1")["samples"], atol=2e-4)


def test_tfb_bayesianizes_a_blob_runs_mean(tmp_path):
    over = HEADS["classifier"][0]
    _, b = _run(tmp_path, "blob", *over, *TINY, "method=blob")
    _, t = _run(tmp_path, "tfb", *over, *TINY, "method=tfb", f"method.map_run={b['run_dir']}", "method.anchor_size=8",
                "method.search_samples=2")
    a1, a2 = (torch.load(d / "checkpoints" / "adapter.pt", weights_only=True) for d in (b["run_dir"], t["run_dir"]))
    assert a1.keys() == a2.keys() and all(torch.equal(a1[k], a2[k]) for k in a1)  # BLoB's mean, not its rho
    assert t["results"]["train"]["posthoc"]["searched"] == 1
