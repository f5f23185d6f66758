"""Probabilistic evaluation in runs (eval.probabilistic), free-text generation and its scores, the entropy
loss, OOD metrics and risk-coverage curves (issue 7)."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import compose
from test_swag import _cfg
from uqlora.errors import UqloraError
from uqlora.metrics.text import exact_match, lcs_length, rouge_l, score_text
from uqlora.methods.base import entropy_subset_flags, predictive_entropy
from uqlora.models.generation import next_token_probs, sample_continuations
from uqlora.build import setup
from uqlora.tasks import train


def test_rouge_l_matches_google_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = np.random.default_rng(0)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "Dog", "ran", "fast", "3", "x-ray"]
    for _ in range(200):
        c = " ".join(rng.choice(vocab, size=rng.integers(0, 9)))
        r = " ".join(rng.choice(vocab, size=rng.integers(1, 9)))
        ours, ref = rouge_l(c, r), scorer.score(r, c)["rougeL"]
        assert ours["fmeasure"] == pytest.approx(ref.fmeasure, abs=1e-12)
        assert ours["recall"] == pytest.approx(ref.recall, abs=1e-12)
        assert ours["precision"] == pytest.approx(ref.precision, abs=1e-12)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert rouge_l("the cat sat", "the cat sat on the mat")["recall"] == pytest.approx(0.5)
    assert exact_match("  The Sun!", "sun") == 1.0 and exact_match("a sun", "moon") == 0.0
    with pytest.raises(ValueError, match="unknown eval.prob.generate.score 'bleu'"):
        score_text("a", "b", "bleu")


def test_next_token_distribution_temperature_top_p_and_adaptive():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]))
    p = next_token_probs(logits, 1.0, 0.7)
    torch.testing.assert_close(p[0], torch.tensor([0.625, 0.375, 0.0]))
    torch.testing.assert_close(p[1], torch.tensor([1.0, 0.0, 0.0]))  # 0.9 alone reaches top_p
    torch.testing.assert_close(next_token_probs(logits, 0.0, 1.0), torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))
    t2 = next_token_probs(logits, 2.0, 1.0)[0]
    ref = torch.tensor([0.5, 0.3, 0.2]) ** 0.5
    torch.testing.assert_close(t2, ref / ref.sum())
    adaptive = next_token_probs(logits, 1.0, 1.0, adaptive_threshold=0.8, adaptive_low=0.0)
    torch.testing.assert_close(adaptive[0], torch.tensor([0.5, 0.3, 0.2]))  # not confident: T = 1
    torch.testing.assert_close(adaptive[1], torch.tensor([1.0, 0.0, 0.0]))  # confident: greedy


def _greedy_reference(backbone, tok, prompt, steps):
    """Greedy decoding of one prompt without padding or KV cache: a full forward pass per token."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = []
    for _ in range(steps):
        h = backbone.transformer(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, -1]
        nxt = int(backbone.lm_head(h).argmax(-1))
        out.append(nxt)
        if nxt == tok.eos_token_id or "\n" in tok.decode([nxt]):
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True).split("\n")[0].strip()


def test_batched_kv_cache_generation_equals_token_by_token_greedy_decoding():
    cfg = compose(["model=tiny_llama", "data=arc_e", "debug=fast"])
    method, dm = setup(cfg)
    bb = method.backbone
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero LoRA update, so the adapters matter
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    bb.eval()
    tok = dm.collator.tok
    prompts = ["Question: why is the sky blue?\nAnswer:", "Hi", "Question: what do plants need to grow in a dark room?"]
    sides = tok.padding_side, tok.truncation_side
    ours = sample_continuations(bb, tok, prompts, max_new_tokens=6, temperature=0.0, generator=torch.Generator())
    assert (tok.padding_side, tok.truncation_side) == sides  # the collator's (right-padded) heads rely on it
    assert ours == [_greedy_reference(bb, tok, p, 6) for p in prompts]
    # sampled continuations are reproducible from the generator's seed
    a = sample_continuations(bb, tok, prompts, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = sample_continuations(bb, tok, prompts, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b


def test_entropy_term_formula_and_subsets(tmp_path):
    cfg = compose(["model=tiny_bert", "debug=fast", "loss.entropy_weight=2.0", "loss.entropy_weight_rest=-0.5",
                   "loss.entropy_subset=labels:1"])
    method, dm = setup(cfg)
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
    flags = torch.tensor([1.0, 0.0, 1.0])
    h = predictive_entropy(logits)
    assert float(h[1]) == pytest.approx(np.log(2))
    expected = 2.0 * (h[0] + h[2]) / 2 - 0.5 * h[1]
    assert float(method.entropy_term(logits, {"entropy_subset": flags})) == pytest.approx(float(expected))
    # masked choices (-1e9) carry no entropy
    assert float(predictive_entropy(torch.tensor([[0.0, 0.0, -1e9]]))[0]) == pytest.approx(np.log(2))
    recs = [{"id": "a", "label": 0}, {"id": "b", "label": 1}, {"id": "c", "label": 2}]
    assert entropy_subset_flags("labels:1,2", recs) == [0.0, 1.0, 1.0]
    (tmp_path / "ids.txt").write_text("c\na\n")
    assert entropy_subset_flags(f"ids:{tmp_path / 'ids.txt'}", recs) == [1.0, 0.0, 1.0]
    assert entropy_subset_flags("all", recs) is None
    cfg_ids = compose(["model=tiny_bert", "debug=fast", "loss.entropy_weight=1.0",
                       f"loss.entropy_subset=ids:{tmp_path / 'ids.txt'}"])
    setup(cfg_ids)  # an id file is accepted before the training records are known
    with pytest.raises(UqloraError, match="unknown loss.entropy_subset 'labels:x'"):
        entropy_subset_flags("labels:x", recs)
    with pytest.raises(UqloraError, match="does not exist"):
        entropy_subset_flags("ids:/nonexistent/ids.txt", recs)


def test_entropy_weight_sign_minimises_or_maximises_the_predictive_entropy(tmp_path):
    ent = {}
    for w in (3.0, -3.0):
        cfg = _cfg(tmp_path, f"e{w}", "model=tiny_bert", "trainer.max_steps=20", "data.max_test_samples=64",
                   f"loss.entropy_weight={w}", "optim.lr=1e-2", "train.restore_best=false")
        train(cfg)
        p = np.load(tmp_path / f"e{w}" / "predictions" / "test.npz")["probs"]
        ent[w] = float(-(p * np.log(np.clip(p, 1e-12, 1))).sum(1).mean())
    assert ent[3.0] < 0.5 * ent[-3.0], ent
    assert ent[-3.0] > 0.6  # near log 2 = 0.69 when maximised


def test_probabilistic_run_with_ood_and_generation_writes_bounds_curves_and_texts(tmp_path):
    """The issue's command on the tiny Llama (subsampled): method=map data=arc_e data.ood=mmlu
    eval.probabilistic=true (+ free-text generation), logged to an offline W&B run."""
    cfg = _cfg(tmp_path, "p", "model=tiny_llama", "data=arc_e", "data.ood=mmlu", "data.max_ood_samples=40",
               "data.max_test_samples=40", "trainer.max_steps=6", "eval.probabilistic=true", "eval.prob.n_samples=64",
               "eval.prob.generate=true", "eval.prob.gen_max_queries=6", "eval.prob.gen_n_samples=3",
               "eval.prob.gen_max_new_tokens=4")
    with open_dict(cfg):
        cfg.logger.kind = "wandb"
    metrics, objs = train(cfg)
    m = metrics["test"]
    run = tmp_path / "p"
    for k in ("prob_greedy", "prob_sampled_lower", "prob_sampled_upper", "prob_expected", "prob_deploy_std_upper",
              "gen_greedy", "gen_sampled_lower", "gen_sampled_upper", "ood_max_prob_auroc", "ood_neg_entropy_fpr95",
              "aurc"):
        assert k in m, k
    assert m["prob_sampled_lower"] <= m["prob_expected"] <= m["prob_sampled_upper"]
    assert m["prob_greedy"] == pytest.approx(m["acc"])
    saved = json.loads((run / "results.json").read_text())["metrics"]["test"]
    assert saved["prob_sampled_upper"] == m["prob_sampled_upper"]
    q = np.load(run / "predictions" / "test_probabilistic.npz")
    assert q["k"].shape == (40,) and (q["k"] <= 64).all() and (q["lower"] <= q["upper"]).all()
    lines = (run / "predictions" / "test_generations.jsonl").read_text().splitlines()
    assert len(lines) == 6 and len(json.loads(lines[0])["samples"]) == 3
    for plot in ("probabilistic_test", "generation_test", "risk_coverage_test", "reliability_test"):
        assert (run / "plots" / f"{plot}.png").is_file(), plot
    wb = list((run / "wandb").glob("offline-run-*"))
    assert len(wb) == 1
    images = [str(i) for i in wb[0].glob("files/media/images/**/*.png")]
    assert any("risk_coverage" in i for i in images) and any("probabilistic" in i for i in images), images


def test_generation_samples_the_posterior_of_a_sampling_method(tmp_path, monkeypatch):
    """Each generation round holds one weight draw of the method (SWAG here): the rounds use the draws."""
    from uqlora.methods.swag import SWAGMethod

    used = []
    orig = SWAGMethod.weight_sample

    def spy(self, s):
        used.append(int(s))
        return orig(self, s)

    monkeypatch.setattr(SWAGMethod, "weight_sample", spy)
    cfg = _cfg(tmp_path, "s", "model=tiny_llama", "data=arc_e", "method=swag", "method.collect_every=2",
               "method.num_samples=3", "trainer.max_steps=8", "data.max_test_samples=8", "eval.probabilistic=true",
               "eval.prob.generate=true", "eval.prob.gen_max_queries=4", "eval.prob.gen_n_samples=6",
               "eval.prob.gen_max_new_tokens=3")
    metrics, _ = train(cfg)
    assert len(used) == 6 and set(used) <= {0, 1, 2}
    assert metrics["test"]["gen_n_samples"] == 6.0


def test_probabilistic_bad_inputs(tmp_path):
    cfg = _cfg(tmp_path, "b", "model=tiny_bert", "trainer.max_steps=2", "eval.probabilistic=true",
               "eval.prob.generate=true")
    with pytest.raises(UqloraError, match="needs a causal LM"):
        train(cfg)


def test_encoder_multiple_choice_head_scores_each_question_choice_pair():
    """model=minilm/tiny_bert on multiple choice (head auto -> mc_classifier): the logits of a batch equal
    the shared linear unit applied to each (question, choice) pair encoded alone; padded choices are masked."""
    cfg = compose(["model=tiny_bert", "data=arc_e", "debug=fast"])
    method, dm = setup(cfg)
    bb = method.backbone.eval()
    assert bb.head_kind == "mc_classifier"
    recs = dm.records["test"][:3]
    batch = dm.collator(recs)
    with torch.no_grad():
        logits = bb.logits(batch)
        tok = dm.collator.tok
        for r, row in zip(recs, logits):
            for i in range(row.shape[0]):
                if i >= len(r["choices"]):
                    assert row[i] == -1e9
                    continue
                enc = tok(r["question"], r["choices"][i], truncation=True, max_length=int(cfg.data.max_length),
                          return_tensors="pt")
                f = bb.features({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
                assert float(row[i]) == pytest.approx(float(bb.head(f)[0, 0]), abs=1e-5)


def test_issue_command_with_the_real_minilm_writes_bounds_and_ood_metrics(tmp_path):
    """`python train.py method=map data=arc_e data.ood=mmlu eval.probabilistic=true`, subsampled, with the
    packaged all-MiniLM-L6-v2 (mc_classifier head) and an offline W&B run."""
    from test_cli import run

    out = tmp_path / "r"
    p, _ = run("method=map", "data=arc_e", "data.ood=mmlu", "eval.probabilistic=true", "trainer.max_steps=6",
               "data.max_train_samples=48", "data.max_val_samples=16", "data.max_test_samples=48",
               "data.max_ood_samples=48", "data.max_length=64", "progress_bar=none", f"hydra.run.dir={out}",
               timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    files = res["data_files"]  # SHA-256 of the data and ood files, checked against ../shared/data/SHA256SUMS
    assert any(k.startswith("arc/") for k in files) and any(k.startswith("mmlu/") for k in files)
    m = res["metrics"]["test"]
    assert m["prob_sampled_lower"] <= m["prob_sampled_mean"] <= m["prob_sampled_upper"]
    assert 0.0 <= m["ood_max_prob_auroc"] <= 1.0 and "ood_neg_entropy_fpr95" in m
    assert "probabilistic (test, n=128" in p.stdout and "OOD AUROC (test vs mmlu)" in p.stdout
    images = [str(i) for i in (out / "wandb").glob("offline-run-*/files/media/images/**/*.png")]
    assert any("risk_coverage" in i for i in images) and any("probabilistic" in i for i in images), images


def test_eval_py_adds_probabilistic_evaluation_to_a_finished_run(tmp_path):
    """eval.py run_dir=<run> eval.probabilistic=true on a run whose config predates eval.prob (defaults apply)."""
    from omegaconf import OmegaConf

    from test_swag import _save_hydra
    from uqlora.context import RunContext
    from uqlora.tasks import evaluate_run

    cfg = _cfg(tmp_path, "old", "model=tiny_bert", "trainer.max_steps=4", "data.max_test_samples=32")
    m0, objs = train(cfg)
    with open_dict(cfg):
        del cfg.eval["prob"], cfg.eval["probabilistic"]
    _save_hydra(cfg, objs["run_dir"])
    ecfg = compose([f"run_dir={objs['run_dir']}"], config_name="eval")
    with open_dict(ecfg):
        ecfg.print_table = False
        ecfg.eval = OmegaConf.create({"probabilistic": True})
    out = tmp_path / "ev"
    metrics, _ = evaluate_run(ecfg, RunContext(out))
    m = metrics["test"]
    assert m["acc"] == pytest.approx(m0["test"]["acc"]) and m["prob_greedy"] == pytest.approx(m0["test"]["acc"])
    assert m["prob_n_samples"] == 128.0 and (out / "plots" / "probabilistic_test.png").is_file()


def test_ensemble_generation_pools_i_i_d_rounds_of_its_members(tmp_path):
    """M = 2 members share n = 5 free-text rounds by one multinomial draw; the pooled rounds are 5."""
    cfg = _cfg(tmp_path, "ens", "model=tiny_llama", "data=sst2", "method=ensemble", "method.num_models=2",
               "trainer.max_steps=4", "data.max_test_samples=8", "eval.probabilistic=true", "eval.prob.generate=true",
               "eval.prob.gen_max_queries=3", "eval.prob.gen_n_samples=5", "eval.prob.gen_max_new_tokens=2")
    metrics, objs = train(cfg)
    assert metrics["test"]["gen_n_samples"] == 5.0 and metrics["test"]["gen_n_queries"] == 3.0
    # member 1 predicts after member 0 generated: its lm_choices scores must still see right padding, i.e. the
    # pooled probabilities equal those of the same run without generation
    cfg2 = _cfg(tmp_path, "ens2", "model=tiny_llama", "data=sst2", "method=ensemble", "method.num_models=2",
                "trainer.max_steps=4", "data.max_test_samples=8")
    train(cfg2)
    with_gen = np.load(tmp_path / "ens" / "predictions" / "test.npz")["probs"]
    without = np.load(tmp_path / "ens2" / "predictions" / "test.npz")["probs"]
    np.testing.assert_allclose(with_gen, without, atol=1e-6)


def test_ood_mmlu_subjects_are_configurable():
    """`data.ood=mmlu +data.ood_options.subjects=[...]`: the ood split holds only those subjects' test questions
    (college chemistry has 100, college physics 102 in MMLU's test split)."""
    from uqlora.data.datamodule import build_splits

    cfg = compose(["data=arc_e", "data.ood=mmlu", "+data.ood_options.subjects=[college_chemistry,college_physics]"])
    ood = build_splits(cfg.data, 0)["ood"]
    assert {r["subject"] for r in ood} == {"college_chemistry", "college_physics"}
    assert len(ood) == 202


def test_eval_scores_a_finished_run_against_an_ood_dataset(tmp_path):
    """`eval.py run_dir=<run> ood=arc_c max_ood_samples=24`: the run's own test split and predictions are
    unchanged, the OOD dataset is scored next to it (the OOD table from finished runs, without retraining)."""
    from uqlora.context import RunContext
    from uqlora.tasks import evaluate_run

    cfg = _cfg(tmp_path, "r", "model=tiny_llama", "data=obqa", "data.max_test_samples=24", "trainer.max_steps=2")
    metrics, objs = train(cfg)
    assert not any(k.startswith("ood_") for k in metrics["test"])
    (objs["run_dir"] / ".hydra").mkdir(exist_ok=True)  # what Hydra writes for a command-line run
    OmegaConf.save(cfg, objs["run_dir"] / ".hydra" / "config.yaml")
    ecfg = compose([f"run_dir={tmp_path / 'r'}", "ood=arc_c", "max_ood_samples=24"], config_name="eval")
    with open_dict(ecfg):
        ecfg.print_table = False
    m2, objs = evaluate_run(ecfg, RunContext(tmp_path / "e"))
    for k in ("acc", "ece", "nll"):
        assert m2["test"][k] == pytest.approx(metrics["test"][k], abs=1e-6)
    assert 0.0 <= m2["test"]["ood_max_prob_auroc"] <= 1.0 and "ood_neg_entropy_fpr95" in m2["test"]
    saved = json.loads((tmp_path / "e" / "results.json").read_text())
    assert saved["config"]["data"]["ood"] == "arc_c" and saved["metrics"]["test"]["ood_max_prob_auroc"] == m2["test"]["ood_max_prob_auroc"]
    # ARC-C's questions are OBQA's kind of task: also scored as a shifted test set, from the saved predictions
    z = np.load(tmp_path / "e" / "predictions" / "ood.npz")
    assert z["labels"].shape == (24,) and (z["labels"] >= 0).all()
    assert m2["ood"]["n"] == 24 and m2["ood"]["acc"] == pytest.approx(float((z["probs"].argmax(1) == z["labels"]).mean()))
    nll = -np.log(z["probs"][np.arange(24), z["labels"]]).mean()
    assert m2["ood"]["nll"] == pytest.approx(float(nll), rel=1e-5)
    assert saved["metrics"]["ood"]["ece"] == m2["ood"]["ece"] and (tmp_path / "e" / "plots" / "reliability_ood.png").is_file()


def test_ood_questions_with_more_choices_than_the_model_are_left_out():
    """An OBQA model scores 4 choices; ARC-C's test split has 3 five-choice questions (and 4 three-choice ones,
    padded): the OOD split leaves out the five-choice ones instead of failing in the middle of the evaluation."""
    from uqlora.data import datasets as ds
    from uqlora.data.datamodule import build_splits

    cfg = compose(["data=obqa", "data.ood=arc_c"])
    full = ds.load_split("arc_c", "test", cfg.data.data_dir)
    ood = build_splits(cfg.data, 0)["ood"]
    assert max(len(r["choices"]) for r in ood) == 4 and min(len(r["choices"]) for r in ood) == 3
    assert len(ood) == len([r for r in full if len(r["choices"]) <= 4]) == len(full) - 3


def test_a_classification_model_scores_ood_questions_as_texts_without_answers():
    """For a classifier (MiniLM on SST-2) the OOD questions are plain texts with label -1: detection only."""
    from uqlora.data.datamodule import build_splits

    cfg = compose(["data=sst2", "data.ood=obqa"])
    ood = build_splits(cfg.data, 0)["ood"]
    assert len(ood) == 500 and all(r["label"] == -1 and r["text_pair"] is None for r in ood)
