"""Token-level SFT (generation data, head lm_sft) and UAL in its own setting: the token loss against a brute-force
sum over the vocabulary (uniform / per-sample smoothing, s = 0 is plain cross-entropy, prompt tokens contribute
nothing), the collator's truncation, the per-token scores, make_score_dist, GSM8K answer extraction, the
uncertainty sources, and whole runs on tiny_llama and SmolLM2-135M-Instruct."""
import json

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from torch.nn import functional as F

from conftest import compose
from test_contract import assert_eval_reproduces
from test_swag import _save_hydra
from uqlora.core.sft import row_weights, token_scores
from uqlora.core.ual import map_uncertainty
from uqlora.data.sft import SFTCollator, fit_lengths
from uqlora.errors import UqloraError
from uqlora.methods.map import MAP
from uqlora.methods.ual import UALMethod, category_uncertainty, sft_teacher_scores
from uqlora.metrics.text import canonical_number, extract_final_number, number_match
from uqlora.models.loading import load_pretrained
from uqlora.models.sft import build_sft_backbone

RECORDS = [
    {"id": "a", "prompt": "What is 2 + 3?", "input": None, "response": "2 + 3 = 5\n#### 5", "source": "gsm8k",
     "answer_number": "5"},
    {"id": "b", "prompt": "Pretend you are a pirate and greet me.", "input": "Be brief.",
     "response": "Arr, ahoy matey! Welcome aboard.", "source": "gpteacher"},
    {"id": "c", "prompt": "Name a colour.", "input": None, "response": "Blue.", "source": "self_instruct"},
]


@pytest.fixture(scope="module")
def tiny():
    """tiny_llama (SmolLM2's tokenizer and chat template, V = 49152) with LoRA and the lm_sft head, dropout off."""
    cfg = compose(["model=tiny_llama", "data=gsm8k", "method=map", "logger=none", "progress_bar=none"])
    model, tok = load_pretrained(cfg.model)
    bb = build_sft_backbone(cfg.model, model)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0: give the adapters a value so they are part of the check
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        bb.lm_head.weight.mul_(50.0)  # (tied to the input embeddings) peaked next-token distributions, so that
    bb.eval()                         # per-token losses differ and the averaging and the smoothing matter
    return cfg, bb, tok


def _method(cfg, bb, cls=MAP, **loss):
    cfg = cfg.copy()
    with open_dict(cfg):
        for k, v in loss.items():
            cfg.loss[k] = v
        if cls is UALMethod:
            cfg.method = compose(["method=ual"]).method
    return cls(bb, cfg)


def _conversation(tok, rec):
    """(rendered prompt, whole conversation without trailing whitespace), straight from the chat template."""
    user = [{"role": "user", "content": rec["prompt"] + (f"\n\n{rec['input']}" if rec.get("input") else "")}]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": rec["response"]}], tokenize=False)
    return prompt, full.rstrip()


_LOGP: dict = {}  # record id -> [L, V] float64 log-probabilities of the fixture's model


def _brute(bb, tok, records, eps, mask_prompt, reduction):
    """float64 from scratch: each conversation tokenised as a whole, the full [L, V] log-probabilities, the explicit
    target distribution (1 - s on the reference token, s / (V - 1) on every other one) at *every* position, and a
    weight per position: 0 for the prompt positions (the length of the prompt tokenised alone) when the prompt is
    masked. Averaged per example then over examples (``sample``) or over all weighted positions (``token``)."""
    per_example, all_terms, all_w = [], [], []
    for rec, s in zip(records, eps):
        prompt, full = _conversation(tok, rec)
        ids = torch.tensor(tok(full)["input_ids"])
        P = len(tok(prompt)["input_ids"])
        if rec["id"] not in _LOGP:
            with torch.no_grad():
                h = bb.transformer(input_ids=ids[None], attention_mask=torch.ones(1, len(ids))).last_hidden_state[0]
                _LOGP[rec["id"]] = torch.log_softmax(h.double() @ bb.lm_head.weight.double().T, -1)
        logp = _LOGP[rec["id"]]
        V = logp.shape[1]
        terms, w = [], []
        for t in range(1, len(ids)):
            q = torch.full((V,), s / (V - 1), dtype=torch.float64)
            q[ids[t]] = 1 - s
            terms.append(float(-(q * logp[t - 1]).sum()))
            w.append(0.0 if mask_prompt and t < P else 1.0)
        terms, w = np.array(terms), np.array(w)
        per_example.append((terms * w).sum() / w.sum())
        all_terms.append(terms)
        all_w.append(w)
    if reduction == "token":
        return float((np.concatenate(all_terms) * np.concatenate(all_w)).sum() / np.concatenate(all_w).sum())
    return float(np.mean(per_example))


@pytest.mark.parametrize("mask_prompt", [True, False])
@pytest.mark.parametrize("reduction", ["sample", "token"])
def test_token_loss_equals_brute_force_over_the_vocabulary(tiny, mask_prompt, reduction):
    cfg, bb, tok = tiny
    coll = SFTCollator(tok, 512, mask_prompt=mask_prompt)
    # the collator's sequences are the joint tokenisation of the rendered conversations (end-of-turn included)
    batch = coll(RECORDS)
    for i, rec in enumerate(RECORDS):
        full = _conversation(tok, rec)[1]
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == tok(full)["input_ids"]
        assert batch["input_ids"][i, n - 1] == tok.eos_token_id  # <|im_end|> is a target: the model learns to stop
    assert batch["labels"].shape == batch["row_sample"].shape == (int(batch["target_mask"].sum()),)
    # the check can fail: the averaging, the smoothing and the prompt mask each change the brute-force value
    ref = _brute(bb, tok, RECORDS, [0.1] * 3, mask_prompt, reduction)
    for other in (_brute(bb, tok, RECORDS, [0.1] * 3, mask_prompt, {"sample": "token", "token": "sample"}[reduction]),
                  _brute(bb, tok, RECORDS, [0.0] * 3, mask_prompt, reduction),
                  _brute(bb, tok, RECORDS, [0.1] * 3, not mask_prompt, reduction)):
        assert abs(other - ref) > 2e-4 * abs(ref)  # 10x the tolerance of the comparisons below
    # uniform smoothing (the baseline), s = 0 (plain cross-entropy), per-sample s (UAL)
    for s in (0.1, 0.0):
        m = _method(cfg, bb, label_smoothing=s, token_reduction=reduction)
        got = float(m.loss(m(batch), batch))
        assert got == pytest.approx(_brute(bb, tok, RECORDS, [s] * 3, mask_prompt, reduction), rel=2e-5)
    ce = F.cross_entropy(bb.logits(batch), batch["labels"])
    if reduction == "token":  # s = 0 with per-token averaging is exactly torch's cross-entropy over the target rows
        assert got == pytest.approx(float(ce), rel=1e-6)
    eps = [0.0, 0.3, 0.05]
    batch = coll([dict(r, label_smoothing=e) for r, e in zip(RECORDS, eps)])
    assert torch.equal(batch["label_smoothing"], torch.tensor(eps)[batch["row_sample"]])  # per sample -> per row
    ual = _method(cfg, bb, UALMethod, token_reduction=reduction)
    got = float(ual.loss(ual(batch), batch))
    assert got == pytest.approx(_brute(bb, tok, RECORDS, eps, mask_prompt, reduction), rel=2e-5)


def test_smoothed_cross_entropy_rows_known_answers():
    """float64, V = 7: the row loss against explicit target distributions -- the authors' token target (1 - s on the
    label, s / (V - 1) on every other class), standard smoothing (1 - s + s / C on the label, s / C elsewhere), a
    per-row s, row weights, and masked choices (no mass)."""
    from uqlora.methods.base import smoothed_cross_entropy

    g = torch.Generator().manual_seed(1)
    z = 3 * torch.randn(6, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (6,), generator=g)
    s = torch.tensor([0.0, 0.1, 0.3, 0.05, 0.5, 0.2], dtype=torch.float64)
    w = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.1], dtype=torch.float64)
    logp = torch.log_softmax(z, -1)
    others = s[:, None] / 6 * (1 - F.one_hot(y, 7)) + (1 - s[:, None]) * F.one_hot(y, 7)
    uniform = s[:, None] / 7 + (1 - s[:, None]) * F.one_hot(y, 7)
    for target, kw in ((others, {"others_only": True}), (uniform, {})):
        rows = -(target * logp).sum(1)
        torch.testing.assert_close(smoothed_cross_entropy(z, y, s, **kw), rows.mean())
        torch.testing.assert_close(smoothed_cross_entropy(z, y, s, weight=w, **kw), (w * rows).sum())
    assert not torch.isclose(smoothed_cross_entropy(z, y, s, others_only=True), smoothed_cross_entropy(z, y, s))
    mask = torch.ones(6, 7, dtype=torch.bool)
    mask[:, 5:] = False
    y4 = y % 5
    zm = z.masked_fill(~mask, -1e9)
    lp = torch.log_softmax(zm, -1)
    t = s[:, None] / 4 * (1 - F.one_hot(y4, 7)) * mask + (1 - s[:, None]) * F.one_hot(y4, 7)
    torch.testing.assert_close(smoothed_cross_entropy(zm, y4, s, mask, others_only=True), -(t * lp).sum(1).mean())
    torch.testing.assert_close(smoothed_cross_entropy(z, y, 0.0, weight=w), (w * F.cross_entropy(z, y, reduction="none")).sum())


def test_prompt_tokens_do_not_reach_the_loss_gradient(tiny):
    """With the prompt masked, the gradient of the loss w.r.t. the last hidden states is zero at every position
    that predicts a prompt token (or padding) and non-zero at every position that predicts a response token."""
    cfg, bb, tok = tiny
    batch = SFTCollator(tok, 512)(RECORDS)
    m = _method(cfg, bb, label_smoothing=0.1)
    h = bb.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    h = h.detach().requires_grad_(True)
    rows, pos = bb.target_rows(batch)
    loss = m.loss(bb.lm_head(h[rows, pos]).float(), batch)
    (g,) = torch.autograd.grad(loss, h)
    used = torch.zeros(h.shape[:2], dtype=torch.bool)
    used[rows, pos] = True
    assert g[~used].abs().max() == 0 and g[used].abs().sum(-1).min() > 0


def test_truncation_keeps_the_response_start():
    assert fit_lengths(10, 5, 20) == (10, 5)
    assert fit_lengths(30, 5, 20) == (15, 5)      # the prompt is cut (from the left), the response whole
    assert fit_lengths(5, 30, 20) == (5, 15)      # the response is cut at its end
    assert fit_lengths(30, 30, 20) == (10, 10)    # both long: the response keeps half the budget
    for n_p, n_r, L in [(1, 1, 2), (50, 1, 8), (1, 50, 8), (7, 9, 3)]:
        kp, kr = fit_lengths(n_p, n_r, L)
        assert kp + kr <= L and kp >= 1 and kr >= 1


def test_collator_truncation_and_targets(tiny):
    _, _, tok = tiny
    long = dict(RECORDS[1], prompt="Tell me a story. " * 40, response="Once upon a time " * 40)
    coll = SFTCollator(tok, 64)
    p, r = coll.encode(long)
    batch = coll([long, RECORDS[2]])
    kp, kr = fit_lengths(len(p), len(r), 64)
    row0 = batch["input_ids"][0].tolist()
    assert int(batch["attention_mask"][0].sum()) == 64 and row0[:kp] == p[-kp:] and row0[kp:kp + kr] == r[:kr]
    assert batch["target_mask"][0].nonzero().squeeze(1).tolist() == list(range(kp, 64))  # response tokens only
    unmasked = SFTCollator(tok, 64, mask_prompt=False)([long])
    assert unmasked["target_mask"][0].nonzero().squeeze(1).tolist() == list(range(1, 64))  # every token but the first
    with pytest.raises(UqloraError, match="too short"):
        SFTCollator(tok, 1)


def test_token_scores_and_row_weights_known_answers():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(7, 11, generator=g).softmax(-1)
    labels, rows = torch.randint(0, 11, (7,), generator=g), torch.tensor([0, 0, 0, 2, 2, 3, 3])
    out = token_scores(probs, labels, rows, 4)
    p, y = probs.double().numpy(), labels.numpy()
    assert out["n_tokens"].tolist() == [3, 0, 2, 2]
    nll = -np.log(p[np.arange(7), y])
    brier = ((p - np.eye(11)[y]) ** 2).sum(1)
    ent = -(p * np.log(p)).sum(1) / np.log(11)
    for key, per_row in (("nll_sum", nll), ("brier_sum", brier), ("nentropy_sum", ent),
                         ("correct_sum", (p.argmax(1) == y).astype(float))):
        np.testing.assert_allclose(out[key].numpy(), np.bincount(rows.numpy(), per_row, minlength=4), rtol=1e-5)
    np.testing.assert_allclose(out["tok_conf"].numpy(), p.max(1), rtol=1e-6)
    w = row_weights(rows, 4, "sample")  # three examples with rows: each weighs 1/3, split over its rows
    np.testing.assert_allclose(w.numpy(), [1 / 9] * 3 + [1 / 6] * 4, rtol=1e-6)
    np.testing.assert_allclose(row_weights(rows, 4, "token").numpy(), [1 / 7] * 7, rtol=1e-6)
    with pytest.raises(UqloraError, match="valid choices: sample, token"):
        row_weights(rows, 4, "nosuch")


def _authors_make_score_dist(raw, target_mean=0.1, max_value=0.99):
    """A transcription of the loop of the UAL authors' make_score_dist (finetune/utils.py)."""
    s = np.array(raw, dtype=np.float64)
    while abs(np.mean(s) - target_mean) >= 0.001:
        s = s / np.mean(s) * target_mean
        s = np.clip(s, s.min(), max_value)
    return s


def test_make_score_dist_keeps_the_mean_the_order_and_the_cap():
    rng = np.random.default_rng(3)
    for u, mean, cap in [(rng.beta(0.5, 2.0, 300), 0.1, 0.99), (rng.random(200) ** 4, 0.3, 0.5),
                         (np.r_[np.zeros(50), rng.random(50)], 0.2, 0.6)]:
        eps = map_uncertainty(u, "mean_scaled", eps_mean=mean, eps_cap=cap)
        assert abs(eps.mean() - mean) < 1e-3 and eps.max() <= cap + 1e-12
        assert (np.diff(eps[np.argsort(u, kind="stable")]) >= -1e-12).all()  # the order of u is kept
        np.testing.assert_allclose(eps, _authors_make_score_dist(u, mean, cap), atol=1e-12)
    assert map_uncertainty(np.full(10, 0.4), "mean_scaled").tolist() == pytest.approx([0.1] * 10)
    with pytest.raises(UqloraError, match="eps_cap"):  # unreachable: the authors' loop would never end
        map_uncertainty(np.r_[np.zeros(95), np.ones(5)], "mean_scaled", eps_mean=0.1, eps_cap=0.5)


@pytest.mark.parametrize("text,number", [
    ("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
    ("Each costs $2, so 5 cost $10.\n#### 1,250", "1250"),
    ("The total is 12 dollars. The answer is 18.", "18"),
    ("So the answer is: $3.50 per cup", "3.5"),
    ("He walks 3 miles, then 4.0 more: 7.0 miles", "7"),
    ("#### -12", "-12"),
    ("Answer = 0.25", "0.25"),
    ("7 apples and 2 pears #### 9 fruits, not 10", "9"),
])
def test_gsm8k_final_number_extraction(text, number):
    assert extract_final_number(text) == number
    assert number_match(text, number) == 1.0 and number_match(text, number + "1") == 0.0


def test_gsm8k_extraction_edge_cases():
    assert extract_final_number("") is None and extract_final_number("no digits here") is None
    assert canonical_number("1,000.50") == "1000.5" and canonical_number("+3.") == "3" and canonical_number("x") is None
    assert number_match("I do not know", "4") == 0.0
    assert number_match("72.00", "72") == 1.0 and number_match("0.5", ".5") == 1.0


def test_uncertainty_sources_category_and_teacher_scores():
    u, info = category_uncertainty({"gsm8k": 0.1, "gpteacher": 0.9, "self_instruct": 0.5}, RECORDS)
    assert u.tolist() == [0.1, 0.9, 0.5] and info["category_counts"] == {"gpteacher": 1, "gsm8k": 1, "self_instruct": 1}
    with pytest.raises(UqloraError, match="no score for source 'gpteacher'"):
        category_uncertainty({"gsm8k": 0.1}, RECORDS)
    pred = {"n_tokens": np.array([2, 3]), "nentropy_sum": np.array([0.4, 0.3]),
            "tok_conf": np.array([0.9, 0.7, 0.5, 0.5, 0.2])}
    np.testing.assert_allclose(sft_teacher_scores(pred, "entropy"), [0.2, 0.1])
    np.testing.assert_allclose(sft_teacher_scores(pred, "sr"), [0.2, 0.6])


# --- whole runs -------------------------------------------------------------------------------------------------------
TINY = ["model=tiny_llama", "logger=none", "progress_bar=none", "print_table=false", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "data.max_train_samples=16", "data.max_val_samples=4", "data.max_test_samples=6",
        "data.max_calib_samples=2", "data.batch_size=4", "data.max_length=96", "eval.sft.max_queries=2",
        "eval.sft.max_new_tokens=6"]


def _cfg(tmp_path, name, *overrides):
    cfg = compose([*TINY, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / name)
    return cfg


def _train(cfg):
    from uqlora.tasks import train

    metrics, objs = train(cfg)
    _save_hydra(cfg, objs["run_dir"])
    return metrics, objs["run_dir"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finished MAP-SFT run on instruct_mix (the teacher of UAL runs)."""
    return _train(_cfg(tmp_path_factory.mktemp("teacher"), "map", "data=instruct_mix", "method=map"))


def test_ual_with_a_teacher_on_mixed_data_and_eval_reproduces_it(tmp_path, teacher):
    tm, tdir = teacher
    test = tm["test"]
    assert {"nll", "acc", "ece", "brier", "n_tokens"} <= set(test) and test["n_tokens"] > 0
    assert {"nll_gsm8k", "gsm8k_acc", "rouge_l"} & set(test)  # per source / per kind, whichever the 6 test rows hold
    args = ["data=instruct_mix", "method=ual", f"method.teacher_run={tdir}", f"method.cache_dir={tmp_path / 'cache'}",
            "data.max_train_samples=12"]
    metrics, run = _train(_cfg(tmp_path, "ual", *args))
    res = json.loads((run / "results.json").read_text())
    post = res["train"]["posthoc"]
    assert post["teacher_cache_hit"] is False and abs(post["eps_mean"] - 0.1) < 1e-3 and post["eps_max"] > post["eps_min"]
    cached = json.loads(open(post["teacher_cache"]).read())
    assert len(cached["u"]) == 12 and cached["identity"]["sft"] == {"mask_prompt": True, "max_length": 96}
    _, run2 = _train(_cfg(tmp_path, "ual2", *args))  # the second run reads the cache
    assert json.loads((run2 / "results.json").read_text())["train"]["posthoc"]["teacher_cache_hit"] is True
    # eval.py: the run directory alone gives the same token scores and answers
    assert_eval_reproduces(run, tmp_path / "eval", metrics)


@pytest.mark.parametrize("method,extra", [
    ("label_smoothing", []),
    ("mc_dropout", ["method.num_samples=2"]),
    ("swag", ["method.collect_every=1", "method.num_samples=2", "method.start=0.5"]),
    ("ual", ["method.uncertainty_source=category"]),
])
def test_methods_on_generation_data(tmp_path, method, extra):
    probabilistic = ["eval.probabilistic=true", "eval.prob.generate=true", "eval.prob.gen_n_samples=3",
                     "eval.sft.silhouette=true", "data.max_test_samples=16"] if method == "mc_dropout" else []
    metrics, run = _train(_cfg(tmp_path, method, "data=instruct_mix", f"method={method}", *extra, *probabilistic))
    m = metrics["test"]
    assert 0 <= m["acc"] <= 1 and 0 <= m["ece"] <= 1 and m["nll"] > 0
    assert (run / "plots" / "reliability_test.png").is_file() and (run / "predictions" / "test_answers.jsonl").is_file()
    if method == "mc_dropout":  # sampled GSM8K answers with their bounds, the feature-space analysis
        assert m["gen_n_samples"] == 3 and 0 <= m["gen_sampled_lower"] <= m["gen_sampled_upper"] <= 1
        from uqlora.rundir import RunDir

        assert len(set(RunDir(run).predictions("test")["source"].tolist())) > 1  # 16 test rows hold 2+ sources
        assert -1 <= m["silhouette_source"] <= 1
    if method == "ual":
        post = json.loads((run / "results.json").read_text())["train"]["posthoc"]
        assert abs(post["eps_mean"] - 0.1) < 1e-3 and set(post["category_counts"]) <= {"gsm8k", "gpteacher", "self_instruct"}


def test_mc_dropout_token_predictive_is_the_mean_of_its_draws(tmp_path):
    """The predictive of a sampling method on generation data is the mean over S of the token probabilities."""
    from uqlora.build import build_member, load_task

    cfg = _cfg(tmp_path, "mcd", "data=instruct_mix", "method=mc_dropout", "method.num_samples=3")
    method, dm = build_member(cfg, load_task(cfg), 0)
    method.fitted = True
    method.eval()
    batch = next(iter(dm.loader("test")))
    torch.manual_seed(5)
    p = method.token_predictive(batch)
    torch.manual_seed(5)
    draws = method.predictive_samples(batch)
    torch.testing.assert_close(p, draws.float().mean(0), rtol=1e-5, atol=1e-7)


def test_resume_and_tables_and_wandb_on_generation_data(tmp_path, monkeypatch):
    """A run that fails after training resumes from its last.ckpt to the uninterrupted run's numbers; make tables
    lists the generation metrics; the W&B logger (offline) takes the generation report."""
    import uqlora.sft_eval as sft_eval
    from uqlora.logging_utils import finish
    from uqlora.results.cli import main as make_tables

    base = ["data=gsm8k", "method=map", "train.checkpoint_every_n_steps=2"]
    full, _ = _train(_cfg(tmp_path, "sweep/full", *base, "logger=wandb"))
    finish()  # close the W&B run, as train.py does after each run: the offline run is then written out
    real = sft_eval.split_eval
    monkeypatch.setattr(sft_eval, "split_eval", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    cfg = _cfg(tmp_path, "sweep/resumed", *base)
    with pytest.raises(RuntimeError, match="killed"):
        _train(cfg)
    monkeypatch.setattr(sft_eval, "split_eval", real)
    with open_dict(cfg):
        cfg.resume = True
    resumed, run = _train(cfg)
    assert json.loads((run / "results.json").read_text())["train"]["resumed_from"].endswith("last.ckpt")
    assert resumed["test"]["nll"] == pytest.approx(full["test"]["nll"], abs=1e-6)
    assert len(list((tmp_path / "sweep" / "full" / "wandb").glob("offline-run-*"))) == 1
    assert make_tables([str(tmp_path / "sweep"), "--out", str(tmp_path / "tables"), "--metrics", "nll,ece,gsm8k_acc"]) == 0
    md = (tmp_path / "tables" / "tables.md").read_text()
    assert "### GSM8K exact match (%) ↑ -- tiny_llama, test" in md and "| MAP |" in md
    assert any((tmp_path / "tables" / "figures").glob("reliability*"))  # pooled from the runs' token confidences


@pytest.mark.parametrize("overrides,match", [
    (["data=gsm8k", "method=laplace"], "does not run on generation data"),
    (["data=gsm8k", "method=swag", "method.num_models=2"], "pooling members is not supported"),
    (["data=gsm8k", "model=tiny_bert"], "needs a causal LM"),
    (["data=sst2", "model.head=lm_sft"], "lm_sft trains on generation data"),
    (["data=instruct_mix", "method=ual", "method.uncertainty_source=category", "~method.category_scores.gsm8k"],
     "no score for source 'gsm8k'"),
    (["data=gsm8k", "method=label_smoothing", "loss.label_smoothing=0.1"], "loss.label_smoothing must be 0"),
    (["data=gsm8k", "loss.token_reduction=nosuch"], "token_reduction"),
])
def test_bad_generation_settings_fail_in_one_line(tmp_path, overrides, match):
    from uqlora.tasks import train

    with pytest.raises(UqloraError, match=match) as e:
        train(_cfg(tmp_path, "bad", *overrides))
    assert "\n" not in str(e.value)


# --- the real model -------------------------------------------------------------------------------------------------
REAL = ["model=smollm2_135m", "model.precision=32-true", "logger=none", "progress_bar=none", "print_table=false",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "data.max_train_samples=4", "data.max_val_samples=2",
        "data.max_test_samples=3", "data.calib_size=0", "data.batch_size=2", "data.eval_batch_size=3",
        "data.max_length=128", "eval.sft.max_queries=1", "eval.sft.max_new_tokens=16", "optim.lr=3e-4"]


def test_smollm2_gsm8k_ual_with_a_teacher(tmp_path):
    """`python train.py model=smollm2_135m data=gsm8k method=ual ...`: the teacher is a (cheap) tiny_llama MAP run --
    any run on the same data can be the teacher, whatever its model."""
    _, tdir = _train(_cfg(tmp_path, "teacher", "data=gsm8k", "method=map", "trainer.max_steps=2"))
    cfg = compose([*REAL, "data=gsm8k", "method=ual", f"method.teacher_run={tdir}", f"method.cache_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "ual")
    metrics, run = _train(cfg)
    m = metrics["test"]
    assert 0 < m["nll"] < 5 and m["acc"] > 0.3 and m["gsm8k_acc_n"] == 1  # a real instruct model on worked answers
    answers = [json.loads(line) for line in (run / "predictions" / "test_answers.jsonl").open()]
    assert all(a["answer"] for a in answers)  # SmolLM2-Instruct answers in words


def test_smollm2_instruct_mix_ual_by_category(tmp_path):
    cfg = compose([*REAL, "data=instruct_mix", "method=ual", "method.uncertainty_source=category",
                   "data.mask_prompt=false"])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "ual")
    metrics, run = _train(cfg)
    post = json.loads((run / "results.json").read_text())["train"]["posthoc"]
    assert abs(post["eps_mean"] - 0.1) < 1e-3
    assert 0 < metrics["test"]["nll"] < 6
