"""The packed cloze head (context once per question, block attention mask) against the separate one (one
sequence per choice) and against brute force: log-likelihoods, LoRA gradients (attention and MLP targets),
GLM Jacobians, features, KFAC factors (each path against the definition on its own graph); and evaluation
batches grouped by length."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import compose
from uqlora.core.kfac import capture, fit_kfac, per_example_jacobians, select_layers
from uqlora.data.cloze_batch import choice_sequence, cloze_pairs
from uqlora.data.prompts import DEFAULT_CLOZE_TEMPLATE, Collator
from uqlora.errors import UqloraError
from uqlora.models.backbone import build_backbone
from uqlora.models.loading import load_pretrained

C = 4
LONG = "a very long answer that goes on and on with many more words than the question itself has"
RECORDS = [
    {"id": "lengths", "question": "What is the colour of the sky on a clear summer day in the mountains?",
     "choices": ["blue", LONG, "a red fox"], "label": 0},                          # context > most choices
    {"id": "one_token", "question": "Pick one.", "choices": ["A", "B", "C", "D"], "label": 2},
    {"id": "reverse", "question": "Hi?", "choices": [LONG, LONG + " again", "no"], "label": 1},  # choices > context
    {"id": "shared", "question": "Which animal?", "choices": ["a red fox", "a red fox jumps", "a blue fox"],
     "label": 1},                                                                   # prefix reaches into choices
    {"id": "dupes", "question": "Same?", "choices": ["same", "same"], "label": 0},   # empty remainders
    {"id": "wino", "question": "", "choices": ["Tom", "Bob"], "label": 1,
     "cloze": [["Tom hit Tom because he", " was angry."], ["Tom hit Bob because he", " was angry."]]},
]
TARGETS = "[q_proj,v_proj,gate_proj,down_proj]"


@pytest.fixture(autouse=True)
def _float64_rmsnorm(monkeypatch):
    """transformers' LlamaRMSNorm normalises in float32 whatever the model's dtype: a float32 noise floor
    under every float64 comparison. Here it normalises in the input's dtype (the same function in fp32)."""
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def _backbone(targets=TARGETS, norm="none", seed=0):
    mcfg = compose(["model=tiny_llama", f"model.lora.target_modules={targets}", f"model.cloze_norm={norm}"]).model
    model, tok = load_pretrained(mcfg)
    bb = build_backbone(mcfg, "lm_cloze", C, tokenizer=tok, model=model).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA B = 0 at init would zero every LoRA A gradient
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return bb, tok


def _run(bb, tok, impl, records=RECORDS, max_length=64, **kw):
    bb.impl = impl
    return Collator(tok, "lm_cloze", "multiple_choice", C, max_length, cloze_impl=impl)(records), bb


def _brute_loglik(bb, tok, rec, max_length=64):
    """Each choice's summed continuation log-likelihood from its own sequence, computed alone."""
    out = []
    for ctx, cont in cloze_pairs(rec, DEFAULT_CLOZE_TEMPLATE):
        s, start = choice_sequence(tok, ctx, cont, max_length)
        ids = torch.tensor([s])
        with torch.no_grad():
            h = bb.transformer(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            lp = F.log_softmax(bb.lm_head(h), -1)[0]
        out.append(sum(lp[j - 1, s[j]].item() for j in range(start, len(s))))
    return out


@pytest.mark.parametrize("max_length", [64, 12])  # 12: contexts cut from the left, differently per choice
def test_packed_scores_equal_separate_and_brute_force(max_length):
    bb, tok = _backbone()
    logits = {}
    for impl in ("packed", "separate"):
        batch, _ = _run(bb, tok, impl, max_length=max_length)
        with torch.no_grad():
            logits[impl] = bb.logits(batch).double()
    valid = Collator(tok, "lm_cloze", "multiple_choice", C, max_length)(RECORDS)["choice_mask"]
    torch.testing.assert_close(logits["packed"][valid], logits["separate"][valid], rtol=1e-10, atol=1e-10)
    for b, rec in enumerate(RECORDS):
        expect = torch.tensor(_brute_loglik(bb, tok, rec, max_length), dtype=torch.float64)
        torch.testing.assert_close(logits["packed"][b, : len(expect)], expect, rtol=1e-10, atol=1e-10)
    p = logits["packed"].softmax(-1)
    assert (p[~valid] == 0).all() and (p[valid] > 0).all()  # missing choices: probability exactly 0


def test_packed_layout_rebuilds_every_choice_sequence():
    bb, tok = _backbone()
    batch, _ = _run(bb, tok, "packed")
    sep, _ = _run(bb, tok, "separate")
    T = batch["input_ids"].shape[1]
    assert T < sep["input_ids"].shape[1] * C  # fewer tokens than C rows per question
    for b, rec in enumerate(RECORDS):
        seg, pos, ids = batch["segment_ids"][b], batch["position_ids"][b], batch["input_ids"][b]
        for c in range(len(rec["choices"])):
            keep = (seg == 0) | (seg == c + 1)
            rebuilt = ids[keep][pos[keep].argsort()]
            row = sep["input_ids"][b * C + c][sep["attention_mask"][b * C + c].bool()]
            assert torch.equal(rebuilt, row)
            assert torch.equal(pos[keep].sort().values, torch.arange(len(row)))
    assert (batch["segment_ids"][batch["attention_mask"] == 0] == -1).all()


@pytest.mark.parametrize("norm", ["none", "token", "char"])
def test_lora_gradients_equal_between_paths(norm):
    """Training: the same loss and the same gradient of every LoRA matrix, MLP targets (inside the context
    computation) included; eval mode (dropout would draw different masks in the two graphs)."""
    bb, tok = _backbone(norm=norm)
    grads, losses = {}, {}
    for impl in ("packed", "separate"):
        batch, _ = _run(bb, tok, impl)
        bb.zero_grad()
        loss = F.cross_entropy(bb.logits(batch).double(), batch["labels"])
        loss.backward()
        losses[impl] = loss.item()
        grads[impl] = {n: p.grad.clone() for n, p in bb.named_parameters() if p.requires_grad}
    assert losses["packed"] == pytest.approx(losses["separate"], rel=1e-10)
    assert any("gate_proj" in n for n in grads["packed"]) and any("down_proj" in n for n in grads["packed"])
    for n, g in grads["packed"].items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(g, grads["separate"][n], rtol=1e-8, atol=1e-12)


def test_features_and_glm_jacobians_equal_between_paths():
    bb, tok = _backbone()
    layers = select_layers(bb, "all")
    feats, jacs = {}, {}
    for impl in ("packed", "separate"):
        batch, _ = _run(bb, tok, impl)
        with torch.no_grad():
            _, f = bb.logits_with_features(batch)
        feats[impl] = f
        with capture(layers):
            logits = bb.logits(batch)
        jacs[impl] = per_example_jacobians(layers, logits, batch)
    valid = batch["choice_mask"]
    assert feats["packed"].shape == (len(RECORDS), C, bb.hidden_size)
    torch.testing.assert_close(feats["packed"][valid], feats["separate"][valid], rtol=1e-10, atol=1e-10)
    assert (feats["packed"][~valid] == 0).all()
    for lay, a, b in zip(layers, jacs["packed"], jacs["separate"]):
        assert a.abs().max() > 0, lay.name
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_tokenizer_padding_side_does_not_change_batches():
    bb, tok = _backbone()
    for impl in ("packed", "separate"):
        tok.padding_side = "right"
        right = Collator(tok, "lm_cloze", "multiple_choice", C, 64, cloze_impl=impl)(RECORDS)
        tok.padding_side = "left"
        left = Collator(tok, "lm_cloze", "multiple_choice", C, 64, cloze_impl=impl)(RECORDS)
        assert right.keys() == left.keys() and all(torch.equal(right[k], left[k]) for k in right)
    tok.padding_side = "left"
    col = Collator(tok, "lm_choices", "multiple_choice", C, 64)
    assert col(RECORDS[:2])["attention_mask"][:, 0].all()  # the other heads pad on the right whatever the tokenizer


# --- KFAC: each path's factors against the definition on its own graph --------------------------------------
def _brute_kfac(bb, layers, batches, approx):
    """A = sum_n mean_t a_t a_t^T (expand) or abar abar^T (reduce); G = sum_n sum_c sum_t g g^T (expand) or
    (sum_t g)(sum_t g)^T (reduce), g the gradient of v_c . logits w.r.t. the layer's output at position t,
    v_c = sqrt(p_c) (e_c - p): every example computed alone, one plain backward pass per class."""
    A = {lay.name: 0.0 for lay in layers}
    G = {lay.name: 0.0 for lay in layers}
    for single in batches:
        ins, outs = {}, {}

        def keep(m, i, o, name):
            ins[name], outs[name] = i[0].detach(), o

        hooks = [lay.module.register_forward_hook(lambda m, i, o, n=lay.name: keep(m, i, o, n)) for lay in layers]
        logits = bb.logits(single)[0].double()
        for h in hooks:
            h.remove()
        real = single["attention_mask"].reshape(-1).bool()
        p = logits.detach().softmax(-1)
        for lay in layers:
            a = ins[lay.name].reshape(-1, ins[lay.name].shape[-1])[real]
            A[lay.name] = A[lay.name] + (a.T @ a / len(a) if approx == "expand" else torch.outer(a.mean(0), a.mean(0)))
        for c in range(C):
            v = p[c].sqrt() * (torch.eye(C, dtype=p.dtype)[c] - p)
            gs = torch.autograd.grad(logits @ v, [outs[lay.name] for lay in layers], retain_graph=True)
            for lay, g in zip(layers, gs):
                g = g.reshape(-1, g.shape[-1])[real]
                G[lay.name] = G[lay.name] + (g.T @ g if approx == "expand" else torch.outer(g.sum(0), g.sum(0)))
    return A, G


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_factors_equal_their_definition_on_each_graph(approx):
    bb, tok = _backbone()
    recs = RECORDS[:5]
    dense = {}
    for impl in ("packed", "separate"):
        col = Collator(tok, "lm_cloze", "multiple_choice", C, 64, cloze_impl=impl)
        bb.impl = impl
        layers = select_layers(bb, "all")
        res = fit_kfac(bb, [col(recs[i:i + 3]) for i in (0, 3)], layers, progress=False, approx=approx,
                       lowrank_threshold=1000)
        A, G = _brute_kfac(bb, layers, [col([r]) for r in recs], approx)
        for lay in res.layers:
            torch.testing.assert_close(lay.A.dense(), A[lay.name], rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(lay.G.dense(), G[lay.name], rtol=1e-8, atol=1e-12)
        dense[impl] = [lay.A.dense().clone() for lay in res.layers]
    # different graphs (the context once vs C times): the factors differ, unlike the Jacobians
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(dense["packed"], dense["separate"]))


# --- options and errors --------------------------------------------------------------------------------------
def test_bad_cloze_impl_and_layout_mismatch_fail_with_one_line():
    bb, tok = _backbone()
    with pytest.raises(UqloraError, match="cloze_impl 'nosuch'; valid choices: packed, separate"):
        Collator(tok, "lm_cloze", "multiple_choice", C, 64, cloze_impl="nosuch")
    mcfg = compose(["model=tiny_llama", "model.cloze_impl=nosuch"]).model
    model, tok2 = load_pretrained(mcfg)
    with pytest.raises(UqloraError, match="cloze_impl 'nosuch'; valid choices: packed, separate"):
        build_backbone(mcfg, "lm_cloze", C, tokenizer=tok2, model=model)
    batch, _ = _run(bb, tok, "separate")
    bb.impl = "packed"
    with pytest.raises(UqloraError, match="'separate' cloze batch reached a model with model.cloze_impl=packed"):
        bb.logits(batch)
    bb.transformer.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UqloraError, match="needs an attention implementation that takes a 4D mask"):
        bb.logits(_run(bb, tok, "packed")[0])


def test_eager_attention_gives_the_same_scores():
    bb, tok = _backbone()
    batch, _ = _run(bb, tok, "packed")
    with torch.no_grad():
        sdpa = bb.logits(batch)
        bb.transformer.config._attn_implementation = "eager"
        eager = bb.logits(batch)
    torch.testing.assert_close(eager, sdpa, rtol=1e-7, atol=1e-7)  # eager's softmax runs in float32


def test_real_smollm2_packed_equals_separate_on_arc_easy():
    from uqlora.data.datamodule import build_splits

    cfg = compose(["model=smollm2_135m", "data=arc_e"])
    recs = build_splits(cfg.data, 0)["test"][:4]
    model, tok = load_pretrained(cfg.model)
    bb = build_backbone(cfg.model, "lm_cloze", 5, tokenizer=tok, model=model).eval()
    out = {}
    for impl in ("packed", "separate"):
        bb.impl = impl
        batch = Collator(tok, "lm_cloze", "multiple_choice", 5, 128, cloze_impl=impl)(recs)
        with torch.no_grad():
            out[impl] = bb.logits(batch)
    valid = batch["choice_mask"]
    assert valid.sum() > 4 * 3 - 1
    assert (out["packed"][valid] - out["separate"][valid]).abs().max() < 1e-4  # fp32, per-character scores
    assert torch.equal(out["packed"].argmax(-1), out["separate"].argmax(-1))


# --- evaluation batches grouped by length ---------------------------------------------------------------------
@pytest.mark.parametrize("data", ["arc_e", "sst2"])  # the cloze head and lm_choices
def test_grouped_evaluation_predictions_equal_data_order(data):
    import lightning.pytorch as pl

    from uqlora.build import setup
    from uqlora.predict import predict

    cfg = compose(["model=tiny_llama", f"data={data}", "data.max_test_samples=23", "data.eval_batch_size=4",
                   "progress_bar=none"])
    method, dm = setup(cfg)
    method.posthoc_fit(dm)  # MAP: nothing to fit; the method may predict from here on
    method.backbone.eval()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    grouped = dm.loader("test")
    order = [i for b in grouped.batch_sampler for i in b]
    lengths = dm.lengths("test")
    assert order != list(range(23)) and sorted(order) == list(range(23))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    first = next(iter(grouped))
    assert first["index"].tolist() == order[:4]
    ref = trainer.predict(method, dataloaders=dm.loader("test", group_by_length=False))
    ref_probs = torch.cat([o["probs"] for o in ref]).numpy()
    res = predict(trainer, method, dm, "test")
    assert list(res["ids"]) == [str(r["id"]) for r in dm.records["test"]]
    assert np.array_equal(res["labels"], [r["label"] for r in dm.records["test"]])
    np.testing.assert_allclose(res["probs"], ref_probs, rtol=1e-5, atol=1e-6)
    tokens = lambda loader: sum(b["input_ids"].numel() for b in loader)  # noqa: E731
    assert tokens(grouped) < tokens(dm.loader("test", group_by_length=False))  # less padding


@pytest.mark.parametrize("n,world", [(11, 2), (7, 3), (1, 2)])
def test_ddp_shards_of_a_grouped_loader_are_grouped_and_restore_data_order(n, world):
    from uqlora.distributed import ShardSampler

    lengths = [int(x) for x in np.random.default_rng(n).integers(1, 9, n)]
    shards = [list(ShardSampler(n, world, r, lengths)) for r in range(world)]
    for shard in shards:
        assert [lengths[i] for i in shard] == sorted((lengths[i] for i in shard), reverse=True)
    assert sum((sorted(s) for s in shards), []) == list(range(n))  # each shard put back in order, in rank order
