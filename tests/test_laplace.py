"""Laplace-LoRA: KFAC factors, posterior, evidence and predictives against brute force in float64 on a
tiny LoRA net (a few hundred parameters); then the method end to end (tiny and real models), eval.py
reusing the saved posterior, and a MAP run reused through method.map_run."""
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn
from torch.func import functional_call, jacrev

from test_swag import _cfg, _eval, _save_hydra
from uqlora.core.kfac import Factor, capture, fit_kfac, per_example_jacobians, select_layers
from uqlora.core.laplace import KronPosterior, glm_predictive
from uqlora.errors import UqloraError
from uqlora.tasks import train

F64 = torch.float64
D_IN, R, H, C = 5, 2, 4, 3


class TinyLoRANet(nn.Module):
    """x [B, (T,) D_IN] -> frozen base + LoRA(B A) -> tanh -> (masked mean over T) -> dropout -> head."""

    def __init__(self, seed=0, dropout=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base = nn.Linear(D_IN, H).requires_grad_(False)
        self.lora_A = nn.Linear(D_IN, R, bias=False)
        self.lora_B = nn.Linear(R, H, bias=False)
        self.drop = nn.Dropout(dropout)
        self.head_input = nn.Identity()
        self.head = nn.Linear(H, C)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=F64) * 0.7

    def forward(self, batch):
        return self.logits(batch)

    def head_parameters(self):
        return self.head.weight, self.head.bias

    def logits(self, batch):
        x = batch["x"]
        h = torch.tanh(self.base(x) + self.lora_B(self.lora_A(x)))
        if h.dim() == 3:
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            h = (h * m).sum(1) / m.sum(1)
        return self.head(self.head_input(self.drop(h)))


def _data(n=7, T=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, D_IN) if T is None else (n, T, D_IN)
    batch = {"x": torch.randn(shape, generator=g, dtype=F64), "labels": torch.randint(0, C, (n,), generator=g)}
    if T is not None:
        lengths = torch.randint(1, T + 1, (n,), generator=g)
        batch["attention_mask"] = (torch.arange(T)[None] < lengths[:, None]).long()
        batch["x"] = batch["x"] * batch["attention_mask"].unsqueeze(-1)  # pads are zeros (overwritten below)
    return batch


def _loader(batch, bs):
    n = batch["labels"].shape[0]
    return [{k: v[i:i + bs] for k, v in batch.items()} for i in range(0, n, bs)]


def _fit(net, batch, bs=3, **kw):
    layers = select_layers(net, "all")
    res = fit_kfac(net, _loader(batch, bs), layers, progress=False, **kw)
    return layers, res


PARAMS = {"lora_A": ["lora_A.weight"], "lora_B": ["lora_B.weight"], "head": ["head.weight", "head.bias"]}


def _layer_jac(net, lay_name, batch):
    """d logits / d W_aug (bias as the last column, row-major) per example, by brute force: [B, C, out*in]."""
    names = PARAMS[lay_name]
    params = {n: p.detach() for n, p in net.named_parameters() if n in names}
    jac = jacrev(lambda ps: functional_call(net, ps, (batch,)))(params)
    B, Cc, out = jac[names[0]].shape[:3]
    return torch.cat([jac[n].reshape(B, Cc, out, -1) for n in names], -1).reshape(B, Cc, -1)


def _dense_ggn(net, batch, names=("lora_A", "lora_B", "head")):
    """Exact GGN sum_n J_n^T (diag p - p p^T) J_n per layer block."""
    with torch.no_grad():
        p = net.logits(batch).softmax(-1)
    lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return {n: torch.einsum("bcp,bcd,bdq->pq", _layer_jac(net, n, batch), lam, _layer_jac(net, n, batch))
            for n in names}


# --- factors ----------------------------------------------------------------------------------------------
def test_factors_equal_hand_computed_covariances():
    net = TinyLoRANet()
    batch = _data(7)
    layers, res = _fit(net, batch)
    x, y = batch["x"], batch["labels"]
    with torch.no_grad():
        u = net.lora_A(x)
        h = torch.tanh(net.base(x) + net.lora_B(u))
        p = net.head(h).softmax(-1)
    lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    W = net.head.weight.detach()
    dh = (1 - h ** 2)                                   # d tanh
    Jh = W.unsqueeze(0) * dh.unsqueeze(1)               # d logits / d (pre-activation) [B, C, H]
    Ju = Jh @ net.lora_B.weight.detach()                # d logits / d u [B, C, R]
    expect = {
        "lora_A": (x.T @ x, torch.einsum("bcr,bcd,bds->rs", Ju, lam, Ju)),
        "lora_B": (u.T @ u, torch.einsum("bch,bcd,bdk->hk", Jh, lam, Jh)),
        "head": ((lambda a: a.T @ a)(torch.cat([h, torch.ones(7, 1, dtype=F64)], 1)), lam.sum(0)),
    }
    assert res.n_data == 7
    assert res.log_lik == pytest.approx(float(torch.log(p.gather(1, y[:, None])).sum()), abs=1e-12)
    for lay in layers:
        A, G = expect[lay.name]
        torch.testing.assert_close(lay.A.dense(), A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lay.G.dense(), G, rtol=1e-10, atol=1e-12)


def test_one_data_point_kfac_equals_exact_ggn():
    net = TinyLoRANet(seed=3)
    batch = _data(1, seed=4)
    layers, res = _fit(net, batch, bs=1)
    ggn = _dense_ggn(net, batch)
    for lay in layers:
        kfac = torch.kron(lay.G.dense(), lay.A.dense()) / res.n_data
        torch.testing.assert_close(kfac, ggn[lay.name], rtol=1e-9, atol=1e-12)


def test_fisher_variants_mc_and_empirical():
    net = TinyLoRANet()
    batch = _data(6)
    _, exact = _fit(net, batch)
    _, emp = _fit(net, batch, fisher="empirical")
    with torch.no_grad():
        p = net.logits(batch).softmax(-1)
    v = p - torch.eye(C, dtype=F64)[batch["labels"]]
    head_emp = [lay for lay in emp.layers if lay.name == "head"][0]
    torch.testing.assert_close(head_emp.G.dense(), v.T @ v, rtol=1e-10, atol=1e-12)
    _, mc = _fit(net, batch, fisher="mc", n_samples=4000, seed=0)
    for a, b in zip(exact.layers, mc.layers):
        torch.testing.assert_close(b.G.dense(), a.G.dense(), rtol=0.1, atol=0.03)
        torch.testing.assert_close(b.A.dense(), a.A.dense())  # activations do not depend on the labels


def test_sequences_padding_and_ragged_batches_do_not_change_factors():
    net = TinyLoRANet(seed=5)
    batch = _data(7, T=4, seed=6)
    _, ref = _fit(net, batch, bs=7, approx="reduce")
    padded = {k: v.clone() for k, v in batch.items()}
    padded["x"] = torch.cat([padded["x"], torch.randn(7, 3, D_IN, dtype=F64)], 1)        # garbage at pad positions
    padded["x"][:, :4][batch["attention_mask"] == 0] = 5.0
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(7, 3, dtype=torch.long)], 1)
    _, other = _fit(net, padded, bs=3, approx="reduce")                         # ragged: 3 + 3 + 1
    for a, b in zip(ref.layers, other.layers):
        torch.testing.assert_close(b.A.dense(), a.A.dense(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b.G.dense(), a.G.dense(), rtol=1e-10, atol=1e-12)
    # KFAC-reduce: A from the masked mean input, G from the summed output gradients of each sequence
    x, m = batch["x"], batch["attention_mask"].unsqueeze(-1).double()
    x_bar = (x * m).sum(1) / m.sum(1)
    lora_a = [lay for lay in ref.layers if lay.name == "lora_A"][0]
    torch.testing.assert_close(lora_a.A.dense(), x_bar.T @ x_bar, rtol=1e-10, atol=1e-12)


def test_kfac_expand_factors_per_position_and_padding_invariant():
    """KFAC-expand: A = sum_n mean_t a_t a_t^T over the non-pad positions, G = sum_{n,t} g_t g_t^T, where
    g_t = d(-log p)/d(output at t) (exact Fisher: summed over the C vectors sqrt(p_c)(e_c - p))."""
    net = TinyLoRANet(seed=5)
    batch = _data(7, T=4, seed=6)
    layers, res = _fit(net, batch, bs=7, approx="expand")
    x, mask = batch["x"], batch["attention_mask"].bool()
    m = mask.unsqueeze(-1).double()
    with torch.no_grad():
        u = net.lora_A(x)
        pre = net.base(x) + net.lora_B(u)
        h = torch.tanh(pre)
        hbar = (h * m).sum(1) / m.sum(1)
        p = net.head(hbar).softmax(-1)
    lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    # d logits / d pre-activation at position t: W diag(1 - h_t^2) / T_n (masked)  -> [B, T, C, H]
    Jh = net.head.weight.detach()[None, None] * ((1 - h ** 2) * m / m.sum(1, keepdim=True)).unsqueeze(2)
    Ju = Jh @ net.lora_B.weight.detach()
    sq = lambda Z: torch.einsum("btcp,bcd,btdq->pq", Z, lam, Z)  # noqa: E731  sum over n, t of J^T Lam J
    w = (m / m.sum(1, keepdim=True))                           # per-example mean over positions
    expect = {"lora_A": ((x * w).transpose(1, 2) @ x, sq(Ju)), "lora_B": ((u * w).transpose(1, 2) @ u, sq(Jh))}
    for lay in layers:
        if lay.name in expect:
            A, G = expect[lay.name]
            torch.testing.assert_close(lay.A.dense(), A.sum(0), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(lay.G.dense(), G, rtol=1e-10, atol=1e-12)
    padded = {k: v.clone() for k, v in batch.items()}
    padded["x"] = torch.cat([padded["x"], torch.randn(7, 3, D_IN, dtype=F64)], 1)
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(7, 3, dtype=torch.long)], 1)
    _, other = _fit(net, padded, bs=3, approx="expand")
    for a, b in zip(layers, other.layers):
        torch.testing.assert_close(b.A.dense(), a.A.dense(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b.G.dense(), a.G.dense(), rtol=1e-10, atol=1e-12)
    with pytest.raises(UqloraError, match="valid choices: reduce, expand"):
        _fit(net, batch, approx="nosuch")


def test_kfac_expand_sum_factors_every_padded_position_without_1_over_T():
    """KFAC-expand as the Laplace-LoRA code computes it (ASDL ``kfac-expand`` with data_size=1): A sums
    a_t a_t^T over every position of the padded batch -- pads included, no 1/T -- and G is expand's. Without
    padding, A is exactly T times expand's; the head (one vector per example) is the same under all three."""
    net = TinyLoRANet(seed=5)
    batch = _data(7, T=4, seed=6)
    batch["x"] = batch["x"] + 3.0 * (batch["attention_mask"] == 0).unsqueeze(-1)  # non-zero pad activations
    layers, _ = _fit(net, batch, bs=7, approx="expand_sum")
    _, expand = _fit(net, batch, bs=7, approx="expand")
    x = batch["x"]
    with torch.no_grad():
        u = net.lora_A(x)
    expect_A = {"lora_A": torch.einsum("bti,btj->ij", x, x), "lora_B": torch.einsum("bti,btj->ij", u, u)}
    for lay, ref in zip(layers, expand.layers):
        torch.testing.assert_close(lay.G.dense(), ref.G.dense(), rtol=1e-10, atol=1e-12)
        if lay.name in expect_A:
            torch.testing.assert_close(lay.A.dense(), expect_A[lay.name], rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(lay.A.dense(), ref.A.dense(), rtol=1e-10, atol=1e-12)
    full = {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}   # no pads: exactly T x expand
    sums, _ = _fit(net, full, bs=7, approx="expand_sum")
    means, _ = _fit(net, full, bs=7, approx="expand")
    for a, b in zip(sums, means):
        torch.testing.assert_close(a.A.dense(), (4.0 if a.name != "head" else 1.0) * b.A.dense(), rtol=1e-10,
                                   atol=1e-12)


class SeqLoRANet(TinyLoRANet):
    """TinyLoRANet with a choice of activation (tanh, or none: LoRA followed linearly by the pooling) and of
    pooling over the positions (masked mean, or the last non-pad position)."""

    def __init__(self, seed=0, act=True, pool="mean"):
        super().__init__(seed)
        self.act, self.pool = act, pool

    def logits(self, batch):
        x, m = batch["x"], batch["attention_mask"].unsqueeze(-1).to(F64)
        h = self.base(x) + self.lora_B(self.lora_A(x))
        h = torch.tanh(h) if self.act else h
        if self.pool == "mean":
            h = (h * m).sum(1) / m.sum(1)
        else:
            h = h[torch.arange(h.shape[0]), batch["attention_mask"].sum(1) - 1]
        return self.head(self.head_input(h))


def _trace_ratios(net, batch, approx):
    """tr(KFAC block) / tr(exact GGN block) per layer, both for the summed NLL of the batch."""
    layers, res = _fit(net, batch, bs=batch["labels"].shape[0], approx=approx)
    ggn = _dense_ggn(net, batch)
    return {lay.name: float(torch.trace(lay.G.dense()) * torch.trace(lay.A.dense()) / res.n_data
                            / torch.trace(ggn[lay.name])) for lay in layers}


def test_three_kfac_definitions_against_the_exact_ggn():
    """All three against the exact GGN (float64, brute-force Jacobians) of a tiny LoRA net over sequences of
    T = 16 positions (no padding; 8 sequences). Known answers: one position -> all three are the exact GGN
    (checked above for one example); a LoRA layer followed *linearly* by mean pooling, one example -> KFAC-reduce
    is the exact GGN block; expand_sum = T x expand for the LoRA layers. Measured trace ratios KFAC / GGN
    (lora_A, lora_B; the head's is 1.002 / 1.007 under all three), tanh net, inputs with mean 0.5:

        mean pooling:   reduce 1.27, 1.55    expand 0.80, 0.43    expand_sum 12.8, 6.9
        last position:  reduce 0.26, 0.54    expand 1.33, 1.34    expand_sum 21.3, 21.5

    No definition is exact for one loss per sequence; which scale is better for the predictive is measured
    on real models (benchmarks/laplace_kfac_study.py), not here."""
    T = 16
    g = torch.Generator().manual_seed(11)
    batch = {"x": torch.randn(8, T, D_IN, generator=g, dtype=F64) + 0.5, "labels": torch.randint(0, C, (8,), generator=g),
             "attention_mask": torch.ones(8, T, dtype=torch.long)}
    one = {k: v[:1] for k, v in batch.items()}
    lin = SeqLoRANet(seed=12, act=False, pool="mean")
    layers, _ = _fit(lin, one, bs=1, approx="reduce")
    ggn = _dense_ggn(lin, one)
    for lay in layers:
        torch.testing.assert_close(torch.kron(lay.G.dense(), lay.A.dense()), ggn[lay.name], rtol=1e-9, atol=1e-12)
    measured = {}
    for pool in ("mean", "last"):
        net = SeqLoRANet(seed=12, act=True, pool=pool)
        for approx in ("reduce", "expand", "expand_sum"):
            ratios = _trace_ratios(net, batch, approx)
            measured[pool, approx] = (ratios["lora_A"], ratios["lora_B"], ratios["head"])
        heads = {measured[pool, a][2] for a in ("reduce", "expand", "expand_sum")}
        assert max(heads) == pytest.approx(min(heads), rel=1e-9)  # the head: one vector per example, T = 1
        for k in range(2):
            assert measured[pool, "expand_sum"][k] == pytest.approx(T * measured[pool, "expand"][k], rel=1e-9)
    print("trace ratio KFAC / exact GGN (lora_A, lora_B, head):",
          {f"{p}/{a}": tuple(round(r, 4) for r in v) for (p, a), v in measured.items()})
    expect = {("mean", "reduce"): (1.2703, 1.5499), ("mean", "expand"): (0.8014, 0.4290),
              ("mean", "expand_sum"): (12.8226, 6.8639), ("last", "reduce"): (0.2552, 0.5404),
              ("last", "expand"): (1.3325, 1.3408), ("last", "expand_sum"): (21.3193, 21.4527)}
    for key, (ra, rb) in expect.items():
        assert measured[key][:2] == pytest.approx((ra, rb), rel=1e-3), key


def test_fit_runs_in_eval_mode_and_is_deterministic():
    net = TinyLoRANet(dropout=0.5).train()
    batch = _data(7)
    _, a = _fit(net, batch)
    assert not net.drop.training
    net.train()
    _, b = _fit(net, batch)
    for la, lb in zip(a.layers, b.layers):
        torch.testing.assert_close(la.G.dense(), lb.G.dense(), rtol=0, atol=0)


@pytest.mark.parametrize("d,rank,rows", [(6, 6, 40), (9, 12, 5), (9, 9, 300)])
def test_lowrank_factor_equals_dense_when_rank_is_full(d, rank, rows):
    g = torch.Generator().manual_seed(0)
    dense, low = Factor(d), Factor(d, rank=rank)
    for chunk in torch.randn(rows, d, generator=g, dtype=F64).split(7):
        dense.update(chunk)
        low.update(chunk)
    torch.testing.assert_close(low.dense(), dense.dense(), rtol=1e-10, atol=1e-10)
    Q, lam = low.eig()
    torch.testing.assert_close(Q @ torch.diag(lam) @ Q.T, dense.dense(), rtol=1e-10, atol=1e-10)
    other, other_low = Factor(d), Factor(d, rank=rank)  # merging (another process's sum)
    v = torch.randn(11, d, generator=g, dtype=F64)
    other.update(v), other_low.update(v)
    dense.merge(other), low.merge(other_low)
    torch.testing.assert_close(low.dense(), dense.dense(), rtol=1e-10, atol=1e-10)


def test_lowrank_factor_keeps_the_top_eigenspace():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=F64))[0]
    scales = torch.tensor([10.0, 5.0, 3.0] + [0.01] * 27, dtype=F64)
    rows = torch.randn(500, 30, generator=g, dtype=F64) * scales @ basis.T
    low, dense = Factor(30, rank=3), Factor(30)
    for c in rows.split(50):
        low.update(c), dense.update(c)
    err = torch.linalg.matrix_norm(low.dense() - dense.dense(), 2) / torch.linalg.matrix_norm(dense.dense(), 2)
    assert err < 1e-3


# --- posterior ------------------------------------------------------------------------------------------------
def _posterior(net, batch, lowrank=False, delta=0.7, structure="scalar"):
    kw = {"lowrank_threshold": 3, "n_kfac": 2} if lowrank else {}
    layers, res = _fit(net, batch, **kw)
    post = KronPosterior.from_kfac(res, delta, structure)
    return layers, res, post


def _dense_precision(layers, res, delta):
    blocks = [torch.kron(lay.G.dense(), lay.A.dense()) / res.n_data + d * torch.eye(lay.shape[0] * lay.shape[1], dtype=F64)
              for lay, d in zip(layers, delta)]
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("lowrank", [False, True])
def test_glm_variance_equals_dense_J_Sigma_Jt(lowrank):
    net = TinyLoRANet(seed=2)
    layers, res, post = _posterior(net, _data(9, seed=3), lowrank=lowrank)
    if lowrank:
        assert not all(post.full)
    test = _data(4, seed=8)
    Sigma = torch.linalg.inv(_dense_precision(layers, res, post.prior_precision))
    J = torch.cat([_layer_jac(net, n, test) for n in ("lora_A", "lora_B", "head")], -1)  # [B, C, P]
    dense = torch.einsum("bcp,pq,bdq->bcd", J, Sigma, J)
    with torch.enable_grad(), capture(layers):
        logits = net.logits(test)
    fvar = post.functional_variance(post.project(per_example_jacobians(layers, logits, test)))
    torch.testing.assert_close(fvar, dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(post.dense_covariance(), Sigma, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structure", ["scalar", "layerwise"])
@pytest.mark.parametrize("lowrank", [False, True])
def test_log_marginal_likelihood_equals_dense_formula(structure, lowrank):
    net = TinyLoRANet(seed=4)
    batch = _data(8, seed=5)
    delta = torch.tensor([0.3, 2.0, 0.9]) if structure == "layerwise" else 0.5
    layers, res, post = _posterior(net, batch, lowrank=lowrank, delta=delta, structure=structure)
    d = post.prior_precision
    P = _dense_precision(layers, res, d)
    P0 = torch.block_diag(*[dd * torch.eye(lay.shape[0] * lay.shape[1], dtype=F64) for lay, dd in zip(layers, d)])
    theta = [lay.matrix().flatten() for lay in layers]
    scatter = sum(dd * (t @ t) for dd, t in zip(d, theta))  # squared norms
    with torch.no_grad():
        ll = torch.log_softmax(net.logits(batch), -1).gather(1, batch["labels"][:, None]).sum()
    expect = ll - 0.5 * (torch.logdet(P) - torch.logdet(P0) + scatter)
    assert float(post.log_marginal_likelihood()) == pytest.approx(float(expect), rel=1e-10)
    assert float(post.log_det_posterior_precision()) == pytest.approx(float(torch.logdet(P)), rel=1e-10)


def test_marglik_optimisation_finds_the_evidence_maximum():
    net = TinyLoRANet(seed=6)
    _, _, post = _posterior(net, _data(12, seed=7))
    post.optimize_marglik(steps=600, lr=0.1)
    best = float(post.prior_precision[0])
    grid = torch.logspace(-3, 3, 2001, dtype=F64)
    vals = torch.stack([post.log_marginal_likelihood(torch.full((3,), float(g))) for g in grid])
    assert best == pytest.approx(float(grid[vals.argmax()]), rel=0.02)


def test_weight_samples_have_the_posterior_covariance():
    net = TinyLoRANet(seed=7)
    layers, res, post = _posterior(net, _data(9, seed=1), lowrank=True, delta=3.0)
    g = torch.Generator().manual_seed(0)
    draws = post.sample(40000, generator=g)
    flat = torch.cat([d.reshape(d.shape[0], -1) for d in draws], 1)
    mean = torch.cat([t.flatten() for t in post.theta])
    cov = torch.cov(flat.T)
    Sigma = post.dense_covariance()
    se = torch.sqrt((Sigma.diag()[:, None] * Sigma.diag()[None] + Sigma ** 2) / 40000)
    assert ((cov - Sigma).abs() <= 5 * se + 1e-12).float().mean() > 0.99
    assert ((flat.mean(0) - mean).abs() <= 5 * Sigma.diag().sqrt() / 200).all()


def test_state_dict_roundtrip():
    net = TinyLoRANet(seed=8)
    layers, res, post = _posterior(net, _data(9), lowrank=True, delta=torch.tensor([0.2, 1.0, 5.0]),
                                   structure="layerwise")
    again = KronPosterior.from_state_dict(post.state_dict())
    assert float(again.log_marginal_likelihood()) == float(post.log_marginal_likelihood())
    other = _posterior(TinyLoRANet(seed=9), _data(5))[2]
    other.load_state_dict(post.state_dict())
    assert other.names == post.names and torch.equal(other.prior_precision, post.prior_precision)
    assert float(other.log_marginal_likelihood()) == float(post.log_marginal_likelihood())
    torch.testing.assert_close(again.dense_covariance(), post.dense_covariance(), rtol=0, atol=0)


def test_lm_choices_prior_is_on_the_change_from_the_pretrained_rows(tmp_path):
    """The answer rows of an lm_choices head start from the pretrained LM-head rows: the prior is centred there
    (stored in the posterior and its state). Adding one large vector v to every pretrained row and every MAP row
    leaves the predictive unchanged (each logit moves by f.v) and so must leave the evidence unchanged."""
    import copy

    from conftest import compose
    from uqlora.data.prompts import Collator
    from uqlora.models.backbone import build_backbone
    from uqlora.models.loading import load_pretrained

    mcfg = compose(["model=tiny_llama"]).model
    model, tok = load_pretrained(mcfg)
    bb = build_backbone(mcfg, "lm_choices", 2, answer_words=[" no", " yes"], tokenizer=tok, model=model).double().eval()
    recs = [{"id": str(i), "text": t, "text_pair": None, "label": i % 2}
            for i, t in enumerate(["a fine film", "dull and long", "great", "awful acting", "not bad at all", "meh"])]
    batch = Collator(tok, "lm_choices", "classification", 2, 64, {"template": "Review: {text}\nSentiment:"})(recs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the "trained" rows: the pretrained ones plus a change
        bb.answer_rows.add_(0.05 * torch.randn(bb.answer_rows.shape, generator=g, dtype=F64))

    def evidence():
        layers = select_layers(bb, "all")
        res = fit_kfac(bb, [batch], layers, progress=False)
        post = KronPosterior.from_kfac(res, 3.0)
        return post, float(post.log_marginal_likelihood())

    post, before = evidence()
    pretrained = bb.generation_lm_head.weight.detach()[bb.answer_token_ids].double()
    torch.testing.assert_close(post.prior_mean[-1], pretrained)
    assert all(m is None for m in post.prior_mean[:-1])  # LoRA layers: zero mean
    assert float(post.sq_dist()[-1]) == pytest.approx(float(((bb.answer_rows.detach() - pretrained) ** 2).sum()))
    path = tmp_path / "post.pt"
    torch.save(post.state_dict(), path)
    again = KronPosterior.from_state_dict(torch.load(path, weights_only=True))
    assert float(again.log_marginal_likelihood()) == before
    v = 40.0 * torch.randn(bb.answer_rows.shape[1], generator=g, dtype=F64)
    head = copy.deepcopy(bb.generation_lm_head)
    with torch.no_grad():
        head.weight[bb.answer_token_ids] += v.to(head.weight)
        bb.answer_rows.add_(v)
    object.__setattr__(bb, "generation_lm_head", head)
    _, after = evidence()
    assert after == pytest.approx(before, rel=1e-6)  # (a zero-mean prior would move it by ~3 * 40^2 * d)


def test_prior_grid_widens_past_an_edge_and_reports_an_unresolved_one(caplog):
    from uqlora.core.laplace_prior import GRID_LIMITS, grid_search, select_on_grid, tune_marglik

    grid = [10.0 ** (k / 2) for k in range(-8, 9)]                      # 1e-4 .. 1e4, the default
    best, tried, edge = grid_search(lambda g: (math.log10(g) - 6.0) ** 2, grid)
    assert best == pytest.approx(1e6) and edge is None                 # widened by half decades to 1e6 and past it
    assert max(tried) > 1e6 and min(tried) == pytest.approx(1e-4)
    best, tried, edge = grid_search(lambda g: -math.log(g), grid)      # always better higher: stops at the limit
    assert edge == "high" and best == max(tried) and GRID_LIMITS[1] / 10 ** 0.5 <= best <= GRID_LIMITS[1]
    assert select_on_grid([1.0, 2.0, 3.0], [0.5, 0.2, 0.9]) == (2.0, None)
    assert select_on_grid([1.0, 2.0, 3.0], [0.1, 0.2, 0.9]) == (1.0, "low")
    with pytest.raises(UqloraError, match="finite and > 0"):
        grid_search(lambda g: g, [0.0, 1.0])
    # the streamed probit grid search (diagonal variances of every candidate, nothing cached) = the cached NLL
    from uqlora.core.laplace_prior import predictive_nll, tune_val_nll

    net = TinyLoRANet(seed=2)
    layers, _, post = _posterior(net, _data(9, seed=3), lowrank=True)
    cache = []
    for seed in (8, 9):
        val = _data(5, seed=seed)
        with torch.enable_grad(), capture(layers):
            logits = net.logits(val)
        cache.append((logits.detach(), post.project(per_example_jacobians(layers, logits, val)), val["labels"], None))
    info = tune_val_nll(post, iter(cache), [0.01, 0.1, 1.0, 10.0], "grid")
    assert len(info["val_nll_grid"]) >= 4 and float(post.prior_precision[0]) in map(float, info["val_nll_grid"])
    for g, v in info["val_nll_grid"].items():
        assert v == pytest.approx(float(predictive_nll(post, cache, torch.full((3,), float(g), dtype=F64))), rel=1e-9)
    assert info["val_nll"] == pytest.approx(min(info["val_nll_grid"].values()), rel=1e-12)
    # the streamed mc grid search (full covariances, one set of draws per batch shared by every candidate) = the
    # cached mc NLL with the same draws: deterministic, so the candidates differ by the prior only
    info = tune_val_nll(post, iter(cache), [0.01, 0.1, 1.0, 10.0], "grid", link="mc", n_samples=64, seed=5)
    for g, v in info["val_nll_grid"].items():
        delta = torch.full((3,), float(g), dtype=F64)
        assert v == pytest.approx(float(predictive_nll(post, cache, delta, "mc", 64, 5)), rel=1e-9)
    assert predictive_nll(post, cache, delta, "mc", 64, 6) != pytest.approx(float(predictive_nll(post, cache, delta, "mc", 64, 5)), rel=1e-9)
    assert info["val_nll"] == pytest.approx(min(info["val_nll_grid"].values()), rel=1e-12)
    post = _posterior(TinyLoRANet(seed=6), _data(12, seed=7))[2]
    info = tune_marglik(post, steps=600, lr=0.1)
    assert info == {"marglik_converged": True, "prior_at_edge": None}
    info = tune_marglik(post, steps=2, lr=1e-4)
    assert info["marglik_converged"] is True                           # at the optimum already: nothing changes
    post.prior_precision = 1e-3
    with caplog.at_level("WARNING"):
        assert tune_marglik(post, steps=3, lr=0.01)["marglik_converged"] is False
    assert "still changing" in caplog.text


# --- links ------------------------------------------------------------------------------------------------------
def _f(B=64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    f_mu = torch.randn(B, C, generator=g, dtype=F64) * 2
    L = torch.randn(B, C, C, generator=g, dtype=F64) * scale
    return f_mu, L @ L.transpose(1, 2)


def test_probit_matches_mc_with_many_samples():
    g = torch.Generator().manual_seed(0)
    # binary case (one logit random): the classic probit approximation of E[sigmoid(f)], f ~ N(mu, v)
    mu = torch.linspace(-4, 4, 81, dtype=F64)
    for v in (0.5, 3.0, 10.0):
        f_mu = torch.stack([mu, torch.zeros_like(mu)], 1)
        f_var = torch.diag_embed(torch.stack([torch.full_like(mu, v), torch.zeros_like(mu)], 1))
        probit, _ = glm_predictive(f_mu, f_var, "probit")
        mc, samples = glm_predictive(f_mu, f_var, "mc", n_samples=100000, generator=g)
        assert (probit - mc).abs().max() < 0.012
    # C = 3 with moderate variances: close on average (the multiclass probit is a per-logit approximation)
    f_mu = torch.randn(256, C, generator=g, dtype=F64) * 2
    f_var = torch.diag_embed(torch.rand(256, C, generator=g, dtype=F64) * 0.3)
    probit, _ = glm_predictive(f_mu, f_var, "probit")
    mc, samples = glm_predictive(f_mu, f_var, "mc", n_samples=20000, generator=g)
    assert samples.shape == (20000, 256, C)
    torch.testing.assert_close(mc, samples.mean(0))       # the probabilities are averaged, not the logits
    assert (probit - mc).abs().mean() < 0.006
    zero, _ = glm_predictive(f_mu, torch.zeros_like(f_var), "mc", n_samples=3)
    torch.testing.assert_close(zero, f_mu.softmax(-1))     # no variance: the MAP softmax


def test_mc_link_is_invariant_to_a_shift_of_all_logits_and_probit_is_not():
    # the cloze head's logits are scaled log-likelihoods (all negative, their common offset meaningless): the
    # softmax ignores the offset, and so does the mc predictive; probit divides each logit by its own
    # sqrt(1 + pi/8 var), so shifting every logit by the same -10 moves probability to high-variance answers
    f_mu = torch.tensor([[-7.7, -11.1, -10.6, -7.6]], dtype=F64)
    f_var = torch.diag(torch.tensor([5.6, 6.5, 3.9, 2.9], dtype=F64)).unsqueeze(0)
    eps = torch.randn(4000, 1, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    mc, _ = glm_predictive(f_mu, f_var, "mc", n_samples=4000, eps=eps)
    mc_shift, _ = glm_predictive(f_mu - 10, f_var, "mc", n_samples=4000, eps=eps)
    torch.testing.assert_close(mc, mc_shift)
    again, _ = glm_predictive(f_mu, f_var, "mc", n_samples=4000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc, again)                  # eps given = the same draws from the generator
    # the method's draws are per example (seeded by its position): the same in any batch, order or process
    from uqlora.core.laplace import example_draws
    both = example_draws(torch.tensor([3, 7]), 50, 4, seed=1)
    torch.testing.assert_close(both[:, 1], example_draws(torch.tensor([7]), 50, 4, seed=1)[:, 0])
    assert not torch.equal(both[:, 0], both[:, 1]) and not torch.equal(both, example_draws(torch.tensor([3, 7]), 50, 4, 2))
    pr, _ = glm_predictive(f_mu, f_var, "probit")
    pr_shift, _ = glm_predictive(f_mu - 10, f_var, "probit")
    assert (pr - pr_shift).abs().max() > 0.05
    assert pr[0, 0] > mc[0, 0] + 0.1                       # probit over-weights the wide answer 0 (0.58 vs 0.43)


def test_bridge_and_masked_choices():
    f_mu = torch.tensor([[1.0, -0.5, 0.2]], dtype=F64)
    f_var = torch.diag(torch.tensor([0.5, 0.3, 0.8], dtype=F64)).unsqueeze(0)
    p, _ = glm_predictive(f_mu, f_var, "bridge")
    # hand-computed: zero-mean correction, then alpha_k = (1 - 2/K + e^mu_k / K^2 * sum_j e^-mu_j) / var_kk
    v = f_var[0]
    tot = v.sum()
    mu = f_mu[0] - v.sum(-1) * f_mu[0].sum() / tot
    vc = v - torch.outer(v.sum(-1), v.sum(-2)) / tot
    alpha = (1 - 2 / 3 + mu.exp() / 9 * torch.exp(-mu).sum()) / vc.diag()
    torch.testing.assert_close(p[0], alpha / alpha.sum())
    mask = torch.tensor([[True, True, False]])
    f_mu_m = f_mu.clone()
    f_mu_m[0, 2] = -1e9
    f_var_m = f_var.clone()
    f_var_m[0, 2, 2] = 0.0
    for link in ("probit", "mc", "bridge"):
        pm, _ = glm_predictive(f_mu_m, f_var_m, link, n_samples=50, mask=mask)
        assert pm[0, 2] == 0 and pm.sum().item() == pytest.approx(1.0)
    pb, _ = glm_predictive(f_mu_m, f_var_m, "bridge", mask=mask)
    p2, _ = glm_predictive(f_mu[:, :2], f_var[:, :2, :2], "bridge")
    torch.testing.assert_close(pb[:, :2], p2)


# --- the method ---------------------------------------------------------------------------------------------------
TINY = ["model=tiny_bert", "method=laplace", "trainer.max_steps=6", "data.max_train_samples=48",
        "data.max_test_samples=24", "data.max_val_samples=16"]


def test_laplace_run_eval_reuses_posterior_and_map_run(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "lap", *TINY, "method.lowrank_threshold=16", "method.n_kfac=4", "method.prior.method=marglik")
    m, objs = train(cfg)
    run = objs["run_dir"]
    _save_hydra(cfg, run)
    res = json.loads((run / "results.json").read_text())
    post = res["train"]["posthoc"]
    assert post["n_fit"] == res["splits"]["train"] and post["prior_precision"][0] > 0
    assert post["log_marglik"] >= post["log_marglik_init"] - 1e-6  # marglik never lowers the evidence
    state = torch.load(run / "checkpoints" / "method_state.pt", weights_only=True)
    assert len(state["posterior"]["names"]) == 9  # 2 layers x (q, v) x (A, B) + head
    from uqlora.methods import laplace as lap

    def no_refit(*a, **k):
        raise AssertionError("eval.py must not refit the posterior")

    monkeypatch.setattr(lap, "fit_kfac", no_refit)
    again, _ = _eval(tmp_path, run)
    for k in ("acc", "nll", "ece", "brier"):
        assert again["test"][k] == pytest.approx(m["test"][k], abs=1e-6)
    monkeypatch.undo()
    # the same MAP adapter, reused: last-layer Laplace with the NN-sampling predictive, no training
    cfg2 = _cfg(tmp_path, "llla", *TINY, f"method.map_run={run}", "method.subset=last_layer",
                "method.pred_type=nn", "method.num_samples=5", "method.prior.method=val_nll")
    m2, objs2 = train(cfg2)
    res2 = json.loads((objs2["run_dir"] / "results.json").read_text())
    assert res2["train"]["map_run"] == str(run) and "steps" not in res2["train"]
    a = torch.load(run / "checkpoints" / "adapter.pt", weights_only=True)
    b = torch.load(objs2["run_dir"] / "checkpoints" / "adapter.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.load(objs2["run_dir"] / "predictions" / "test.npz")["samples"].shape == (5, 24, 2)
    tried = res2["train"]["posthoc"]["val_nll_grid"]  # the 17 default values, + any widening beyond an end
    assert len(tried) >= 17 and "prior_at_edge" in res2["train"]["posthoc"]
    with pytest.raises(UqloraError, match="another model config"):
        train(_cfg(tmp_path, "bad", *TINY, f"method.map_run={run}", "model.lora.r=4"))
    # a source run made before a model key existed (its config lacks it) is still reused; a changed key is not
    hydra_cfg = run / ".hydra" / "config.yaml"
    old = OmegaConf.load(hydra_cfg)
    with open_dict(old):
        del old.model["cloze_scale_lr"]
    OmegaConf.save(old, hydra_cfg)
    train(_cfg(tmp_path, "older", *TINY, f"method.map_run={run}", "method.subset=last_layer"))
    with pytest.raises(UqloraError, match=r"differs in lora\)"):
        train(_cfg(tmp_path, "bad2", *TINY, f"method.map_run={run}", "model.lora.r=4"))


@pytest.mark.parametrize("bad,match", [
    ("method.link=nosuch", "valid choices: probit, mc, bridge"),
    ("method.fit_split=test", "unknown method.fit_split .test.; valid choices: train, val, calib"),
    ("method.subset=nosuch", "valid choices: all, last_layer"),
    ("method.num_samples=0", "method.num_samples=0 is impossible; valid: an integer >= 1"),
    ("method.kfac_approx=nosuch", "unknown method.kfac_approx .nosuch.; valid choices: "),
])
def test_bad_laplace_options_fail_with_one_line(tmp_path, bad, match):
    with pytest.raises(UqloraError, match=match):
        train(_cfg(tmp_path, "x", *TINY, bad))


@pytest.mark.parametrize("model,data,extra", [
    ("minilm", "sst2", ["trainer.max_steps=30", "data.max_train_samples=160", "data.max_test_samples=96"]),
    ("smollm2_135m", "arc_e", ["trainer.max_steps=2", "data.max_train_samples=4", "data.max_test_samples=4",
                               "data.batch_size=2", "data.max_val_samples=2", "data.eval_batch_size=2"]),
])
def test_real_model_laplace_run_and_eval_reuses_posterior(tmp_path, model, data, extra):
    cfg = _cfg(tmp_path, "run", f"model={model}", f"data={data}", "method=laplace", *extra)
    m, objs = train(cfg)
    run = objs["run_dir"]
    _save_hydra(cfg, run)
    res = json.loads((run / "results.json").read_text())["train"]["posthoc"]
    assert math.isfinite(res["log_marglik"]) and res["prior_precision"][0] > 0
    again, _ = _eval(tmp_path, run)
    for k in ("acc", "nll", "ece"):
        assert again["test"][k] == pytest.approx(m["test"][k], abs=1e-5)


def _load_benchmark(name="laplace_cost"):
    """benchmarks/<name>.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_summary_pairs_seeds_with_the_peer():
    """benchmarks/laplace_cost.py's multi-seed summary: mean, sample std and the paired ours - peer difference
    per quality cell, with the count of seeds where ours is at least as good (known answers)."""
    bench = _load_benchmark()

    def run(seed, ours_ece, peer_ece, nll):
        q = lambda ece, n: {"acc": 0.8, "ece": ece, "nll": n}  # noqa: E731
        cost = {"fit_x_epoch": 1.0 + seed, "predict_x_forward": 3.0, "memory_x_params": 49.0}
        side = lambda ece: {**cost, "prior1": q(ece, nll), "marglik": {"prior": 10.0 + seed, **q(ece, nll)},  # noqa: E731
                            "val_nll": {"prior": 30.0 + seed, **q(ece, nll)}}
        return {"setup": {"seed": seed}, "map": q(0.1, 0.6), "ours_reduce": side(ours_ece),
                "ours_expand": side(ours_ece + 0.05), "laplace_torch": side(peer_ece)}

    summ = bench.summarize([run(0, 0.02, 0.03, 0.40), run(1, 0.05, 0.04, 0.44)])
    assert summ["seeds"] == [0, 1]
    assert summ["ours_reduce"]["fit_x_epoch"] == {"mean": 1.5, "std": round(2 ** -0.5, 4)}
    d = summ["ours_reduce"]["prior1_ece_minus_peer"]
    assert d["mean"] == 0.0 and d["std"] == round(0.02 * 2 ** -0.5, 4) and d["ours_at_least_as_good"] == 1
    assert summ["ours_reduce"]["marglik_nll_minus_peer"]["ours_at_least_as_good"] == 2   # equal counts as good
    assert summ["ours_expand"]["marglik_ece_minus_peer"]["ours_at_least_as_good"] == 0
    assert summ["laplace_torch"]["marglik_prior"]["mean"] == 10.5 and summ["laplace_torch"]["val_nll_prior"]["mean"] == 30.5
    assert summ["ours_reduce"]["val_nll_ece_minus_peer"]["ours_at_least_as_good"] == 1
    assert "prior1_ece_minus_peer" not in summ["laplace_torch"]
    # 95% t-interval over the seeds (t_1 = 12.706): differences -0.01 / +0.01 -> a tie
    assert d["ci95"] == pytest.approx([-12.706 * 0.01, 12.706 * 0.01], abs=2e-4) and d["verdict"] == "tie"
    # three seeds, ours lower by 0.02 / 0.03 / 0.025: mean -0.025, std 0.005, t_2 = 4.303 -> better; reversed -> worse
    three = [run(s, 0.10 - dd, 0.10, 0.4) for s, dd in enumerate((0.02, 0.03, 0.025))]
    c = bench.summarize(three)["ours_reduce"]["prior1_ece_minus_peer"]
    half = 4.303 * 0.005 / 3 ** 0.5
    assert c["ci95"] == pytest.approx([-0.025 - half, -0.025 + half], abs=1e-4) and c["verdict"] == "better"
    three = [run(s, 0.10 + dd, 0.10, 0.4) for s, dd in enumerate((0.02, 0.03, 0.025))]
    assert bench.summarize(three)["ours_reduce"]["prior1_ece_minus_peer"]["verdict"] == "worse"


def test_benchmark_paired_test_set_differences():
    """laplace_cost.paired: per-sentence NLL differences (mean, standard error) and the ECE difference in
    points, on the same test sentences (known answers)."""
    from uqlora.metrics import ece

    bench = _load_benchmark()
    y = np.array([0, 1, 1, 0, 1])
    ours = np.array([[0.9, 0.1], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8]])
    peer = np.array([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5], [0.7, 0.3], [0.1, 0.9]])
    d = -np.log(ours[np.arange(5), y]) + np.log(peer[np.arange(5), y])
    out = bench.paired(ours, peer, y, n_boot=50)
    assert out["nll"] == pytest.approx(d.mean(), abs=1e-5)
    assert out["nll_se"] == pytest.approx(d.std(ddof=1) / 5 ** 0.5, abs=1e-5)
    assert out["ece"] == pytest.approx(100 * (ece(ours, y) - ece(peer, y)), abs=1e-3)
    assert out["ece_se"] > 0
    same = bench.paired(ours, ours, y, n_boot=20)
    assert same == {"nll": 0.0, "nll_se": 0.0, "ece": 0.0, "ece_se": 0.0}


@pytest.mark.parametrize("lowrank", [False, True])
def test_kfac_study_scores_every_prior_from_one_pass_of_jacobians(lowrank):
    """benchmarks/laplace_kfac_study.py's fast path: the probit inputs for K prior precisions at once (diagonal
    of J Sigma J^T only) equal the posterior's own functional variance and GLM probit predictive."""
    from types import SimpleNamespace

    study = _load_benchmark("laplace_kfac_study")
    net = TinyLoRANet(seed=2)
    layers, res, post = _posterior(net, _data(9, seed=3), lowrank=lowrank)
    test = _data(5, seed=8)
    deltas = torch.tensor([[0.3, 0.3, 0.3], [2.0, 0.5, 7.0]], dtype=F64)
    f_mu, var, y, mask = study.logit_variances(SimpleNamespace(layers=layers, backbone=net), {"p": post}, [test],
                                               {"p": deltas})["p"]
    probs = study.probit_probs(f_mu, var, mask)
    for k, d in enumerate(deltas):
        with torch.enable_grad(), capture(layers):
            logits = net.logits(test)
        fvar = post.functional_variance(post.project(per_example_jacobians(layers, logits, test)), d)
        torch.testing.assert_close(var[..., k], torch.diagonal(fvar, dim1=-2, dim2=-1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(probs[k], glm_predictive(logits.detach(), fvar, "probit")[0], rtol=1e-9, atol=1e-12)
    assert torch.equal(y, test["labels"]) and mask is None


def test_kfac_study_fits_every_definition_from_one_pass():
    """benchmarks/laplace_kfac_study.py's fit_all: the factors of several (approx, Fisher) pairs from one forward
    pass per batch equal fit_kfac's for each."""
    from types import SimpleNamespace

    study = _load_benchmark("laplace_kfac_study")
    net = SeqLoRANet(seed=4, pool="mean")
    batch = _data(7, T=4, seed=6)
    keys = [("reduce", "exact"), ("expand", "exact"), ("expand_sum", "exact"), ("expand", "empirical")]
    got = study.fit_all(SimpleNamespace(layers=select_layers(net, "all"), backbone=net), _loader(batch, 3), keys, 100)
    ggn, n = study.ggn_traces(SimpleNamespace(layers=select_layers(net, "all"), backbone=net), _loader(batch, 3), 2)
    dense = _dense_ggn(net, {k: v[:6] for k, v in batch.items()})     # the first 2 batches of 3
    assert n == 6
    torch.testing.assert_close(ggn, torch.stack([torch.trace(dense[k]) / 6 for k in ("lora_A", "lora_B", "head")]),
                               rtol=1e-9, atol=1e-12)
    for approx, fisher in keys:
        _, ref = _fit(net, batch, approx=approx, fisher=fisher)
        res = got[approx, fisher]
        assert res.n_data == ref.n_data and res.log_lik == pytest.approx(ref.log_lik, rel=1e-12)
        for a, b in zip(res.layers, ref.layers):
            torch.testing.assert_close(a.A.dense(), b.A.dense(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a.G.dense(), b.G.dense(), rtol=1e-10, atol=1e-12)



def test_glm_predictive_of_long_batches_is_computed_in_chunks_of_examples_with_the_same_result(tmp_path, monkeypatch):
    """A batch whose (examples x positions x classes) rows exceed GLM_CHUNK_ROWS is split into groups of
    examples (long MMLU questions ran out of 22 GB in one piece): the same f_mu and functional variances, for the
    packed cloze layout of the tiny Llama; example_chunks slices per example (R rows each) and shares the rest."""
    import uqlora.methods.laplace as la

    cfg = _cfg(tmp_path, "c", "model=tiny_llama", "data=obqa", "method=laplace", "trainer.max_steps=2",
               "data.max_train_samples=16", "data.max_val_samples=8", "data.max_test_samples=8",
               "method.prior.method=fixed", "method.num_samples=20")
    _, objs = train(cfg)
    method, dm = objs["method"], objs["datamodule"]
    batch = next(iter(dm.loader("test")))
    B = batch["labels"].shape[0]
    rows = batch["attention_mask"].numel() // B * method.backbone.num_classes
    parts = list(la.example_chunks(batch, 3 * rows, method.backbone.num_classes))
    assert [p["labels"].shape[0] for p in parts] == [3, 3, B - 6] and B == 8
    torch.testing.assert_close(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert len(list(la.example_chunks(batch, B * rows, method.backbone.num_classes))) == 1
    sep = {"labels": torch.arange(4), "input_ids": torch.arange(16).reshape(16, 1),
           "attention_mask": torch.ones(16, 1), "shared": torch.tensor(5)}
    halves = list(la.example_chunks(sep, 4, 1))  # 4 rows (choices) per example, 1 position each: one example each
    assert len(halves) == 4 and halves[1]["input_ids"].flatten().tolist() == [4, 5, 6, 7] and halves[3]["shared"] == 5

    whole_f, whole_proj = method._glm_terms(batch)
    monkeypatch.setattr(la, "GLM_CHUNK_ROWS", 3 * rows)
    f, proj = method._glm_terms(batch)
    torch.testing.assert_close(f, whole_f, rtol=1e-5, atol=1e-5)
    post = method.posterior
    torch.testing.assert_close(post.functional_variance(proj), post.functional_variance(whole_proj), rtol=1e-4, atol=1e-7)
