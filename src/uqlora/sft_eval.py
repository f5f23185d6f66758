"""Evaluation of token-level SFT runs (generation data: ``gsm8k``, ``instruct``, ``instruct_mix``).

The prediction of a generation split (:meth:`uqlora.methods.base.UQMethod.predict_step`,
:func:`uqlora.core.sft.token_scores`) holds per-example sums over the reference answers' tokens and per-token
confidences, not ``[N, V]`` probabilities. :func:`split_eval` adds what needs the model again (options under
``eval.sft``, the sampled answers under ``eval.prob``):

* ``source [N]`` -- each record's data source;
* greedy answers (``eval.sft.generate``) with the point estimate for a seeded subset of at most
  ``max_queries`` GSM8K problems and ``max_queries`` instructions: ``sft_index [K]`` (positions in the split),
  ``sft_kind [K]`` (``gsm8k`` / ``instruct``), ``sft_score [K]`` -- exact match of the final number
  (:func:`uqlora.metrics.text.number_match`) for GSM8K, ROUGE-L F1 against the reference for instructions;
* sampled answers to the same GSM8K problems (``eval.probabilistic=true`` and ``eval.prob.generate=true``):
  ``gen_n_samples`` rounds, round r with the method's weight draw r (as in :mod:`uqlora.evaluation`),
  at ``gen_temperature`` / ``gen_top_p``, scored by exact match -> the probabilistic bounds of the sampled
  accuracy (``gen_*`` metrics, Clopper-Pearson per problem);
* token representations (``eval.sft.silhouette``): the LM head's input at ``silhouette_tokens`` evenly spaced
  target tokens of each example (``feat``, ``feat_example``) -- the feature-space analysis of UAL's paper,
  scored by the silhouette of the representations grouped by data source.

:func:`report_split` turns them into the split's metrics: ``nll`` (mean over all target tokens of
-log p(reference token)), ``acc`` (next-token accuracy), ``ece`` (of the next-token confidence), ``brier``,
``nll_<source>``, ``n_tokens``, ``gsm8k_acc``, ``rouge_l`` (+ their ``_n``), ``gen_*``, ``silhouette_source``;
plus the reliability diagram of the token confidences and the greedy answers in
``predictions/<split>_answers.jsonl``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from uqlora.io import atomic_write
from uqlora.metrics.text import number_match, rouge_l

log = logging.getLogger(__name__)
DEFAULTS = {"generate": True, "max_queries": 32, "max_new_tokens": 256, "seed": 0, "silhouette": False,
            "silhouette_tokens": 4, "silhouette_max_points": 2000}


def sft_options(cfg) -> dict:
    from omegaconf import OmegaConf

    node = cfg.eval.get("sft")
    return {**DEFAULTS, **(OmegaConf.to_container(node, resolve=True) if node is not None else {})}


def kind_of(rec: dict) -> str:
    """``gsm8k`` for math records with a final number, ``instruct`` for the others."""
    return "gsm8k" if rec.get("answer_number") is not None else "instruct"


def query_index(recs: list[dict], k, seed: int) -> dict[str, np.ndarray]:
    """Per kind, a seeded choice of at most ``k`` positions (all when ``k`` is None), in a fixed order whose
    prefixes are the smaller choices."""
    out = {}
    for stream, kind in enumerate(("gsm8k", "instruct")):
        pos = np.array([i for i, r in enumerate(recs) if kind_of(r) == kind], dtype=np.int64)
        if len(pos):
            pos = pos[np.random.default_rng([int(seed), stream]).permutation(len(pos))]
            out[kind] = pos if k is None else pos[: int(k)]
    return out


class _Generator:
    """Answers of the method's backbone (point estimate, or a weight draw under ``method.weight_sample``)."""

    def __init__(self, cfg, method, dm, opts: dict):
        self.method, self.collator = method, dm.collator
        self.device = method.fit_device()
        self.bs = int(cfg.data.get("eval_batch_size", cfg.data.batch_size))
        self.kw = dict(max_new_tokens=int(opts["max_new_tokens"]), max_length=int(cfg.data.max_length),
                       device=self.device, autocast=method.autocast(self.device), stop_at_newline=False,
                       add_special_tokens=dm.collator.prompt_special_tokens)

    def __call__(self, prompts: list[str], temperature=0.0, top_p=1.0, generator=None) -> list[str]:
        from uqlora.models.generation import sample_continuations

        out = []
        for i in range(0, len(prompts), self.bs):
            out += sample_continuations(self.method.backbone, self.collator.tok, prompts[i:i + self.bs],
                                        temperature=temperature, top_p=top_p, generator=generator, **self.kw)
        return out


def split_eval(cfg, method, dm, split: str) -> dict:
    """Per-split arrays of a generation split besides the token scores (see the module docstring)."""
    recs = dm.records[split]
    out: dict = {"source": np.array([str(r.get("source", "")) for r in recs])}
    opts = sft_options(cfg)
    if split == "ood":
        return out
    backbone = method.backbone
    backbone.to(method.fit_device())
    was_training = backbone.training
    backbone.eval()
    try:
        if opts["generate"]:
            out.update(_greedy(cfg, method, dm, recs, opts))
        prob = cfg.eval.get("prob") or {}
        if cfg.eval.get("probabilistic", False) and prob.get("generate", False) and out.get("_gsm8k") is not None:
            out.update(_sampled(cfg, method, dm, recs, opts, out))
        if opts["silhouette"]:
            out.update(_features(method, dm, split, int(opts["silhouette_tokens"])))
    finally:
        backbone.train(was_training)
    out.pop("_gsm8k", None)
    return out


def _greedy(cfg, method, dm, recs, opts) -> dict:
    chosen = query_index(recs, opts["max_queries"], int(opts["seed"]))
    index = np.concatenate([chosen.get("gsm8k", np.zeros(0, np.int64)), chosen.get("instruct", np.zeros(0, np.int64))])
    kinds = np.array(["gsm8k"] * len(chosen.get("gsm8k", ())) + ["instruct"] * len(chosen.get("instruct", ())))
    prompts = [dm.collator.prompt_text(recs[i]) for i in index]
    with torch.no_grad():
        answers = _Generator(cfg, method, dm, opts)(prompts)
    refs = [str(recs[i]["answer_number"] if k == "gsm8k" else recs[i]["response"]) for i, k in zip(index, kinds)]
    scores = np.array([number_match(a, r) if k == "gsm8k" else rouge_l(a, r)["fmeasure"]
                       for a, r, k in zip(answers, refs, kinds)], dtype=np.float64)
    return {"sft_index": index, "sft_kind": kinds, "sft_score": scores,
            "_sft_texts": {"prompts": prompts, "references": refs, "answers": answers},
            "_gsm8k": chosen.get("gsm8k")}


def _sampled(cfg, method, dm, recs, opts, greedy: dict) -> dict:
    """``gen_n_samples`` sampled answers per GSM8K problem (a prefix of the greedy choice, ``gen_max_queries``)."""
    from uqlora.progress import track

    p = cfg.eval.prob
    k = p.get("gen_max_queries")
    index = greedy["_gsm8k"] if k is None else greedy["_gsm8k"][: int(k)]
    n = int(p.get("gen_n_samples", 16))
    prompts = [dm.collator.prompt_text(recs[i]) for i in index]
    refs = [str(recs[i]["answer_number"]) for i in index]
    gen = torch.Generator().manual_seed(int(p.get("seed", 0)))
    draws = np.random.default_rng([int(p.get("seed", 0)), 0]).integers(max(1, int(method.num_weight_samples())), size=n)
    run = _Generator(cfg, method, dm, opts)
    texts = []
    with torch.no_grad():
        for r in track(range(n), f"sampling {n} x {len(prompts)} GSM8K answers", method.progress_mode):
            with method.weight_sample(int(draws[r])):
                texts.append(run(prompts, float(p.get("gen_temperature", 1.0)), float(p.get("gen_top_p", 1.0)), gen))
    scores = np.array([[number_match(t, ref) for t, ref in zip(row, refs)] for row in texts]).reshape(n, len(refs))
    pos = {int(i): j for j, i in enumerate(greedy["sft_index"])}
    greedy_scores = greedy["sft_score"][[pos[int(i)] for i in index]]
    greedy_texts = [greedy["_sft_texts"]["answers"][pos[int(i)]] for i in index]
    return {"gen_scores": scores, "gen_greedy": greedy_scores, "gen_index": index,
            "_gen_texts": {"prompts": prompts, "references": refs, "greedy": greedy_texts, "samples": texts}}


@torch.no_grad()
def _features(method, dm, split: str, per_example: int) -> dict:
    """The LM head's input at ``per_example`` evenly spaced target tokens of every example (point estimate)."""
    feats, owner, offset = [], [], 0
    device = method.fit_device()
    for batch in dm.loader(split):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with method.autocast(device):
            f = method.backbone.features(batch).float().cpu()
        rows = batch["row_sample"].cpu()
        for b in range(batch["input_ids"].shape[0]):
            mine = (rows == b).nonzero().squeeze(1)
            pick = mine[np.unique(np.linspace(0, len(mine) - 1, min(per_example, len(mine))).round().astype(int))]
            feats.append(f[pick])
            owner += [offset + b] * len(pick)
        offset += batch["input_ids"].shape[0]
    return {"feat": torch.cat(feats).numpy(), "feat_example": np.array(owner, dtype=np.int64)}


# --- metrics ------------------------------------------------------------------------------------------------------
def token_metrics(p: dict, n_bins: int = 15) -> tuple[dict, dict]:
    """(metrics, reliability bins) of the token scores of a split: NLL, accuracy, Brier, ECE, per-source NLL."""
    from uqlora.metrics.calibration import confidence_bins, ece_of_bins

    n = np.asarray(p["n_tokens"], dtype=np.float64)
    T = n.sum()
    bins = confidence_bins(p["tok_conf"], p["tok_correct"], n_bins)
    m = {"nll": float(np.sum(p["nll_sum"]) / T), "acc": float(np.sum(p["correct_sum"]) / T),
         "ece": ece_of_bins(bins), "brier": float(np.sum(p["brier_sum"]) / T),
         "entropy": float(np.sum(p["nentropy_sum"]) / T), "n_tokens": float(T)}
    if "source" in p and len(set(p["source"].tolist())) > 1:
        for s in sorted(set(p["source"].tolist())):
            mask = p["source"] == s
            m[f"nll_{s}"] = float(np.sum(p["nll_sum"][mask]) / max(n[mask].sum(), 1.0))
    return m, bins


def silhouette(p: dict, max_points: int = 2000, seed: int = 0) -> float | None:
    """Silhouette (cosine distance) of the token representations grouped by their example's source."""
    from sklearn.metrics import silhouette_score

    labels = p["source"][p["feat_example"]]
    if len(set(labels.tolist())) < 2:
        return None
    sample = min(int(max_points), len(labels))
    return float(silhouette_score(p["feat"], labels, metric="cosine", sample_size=sample, random_state=int(seed)))


def report_split(cfg, run_dir: Path, split: str, p: dict, logger) -> dict:
    """Metrics of one generation split; writes the reliability diagram, the answers and the sampled bounds."""
    from uqlora.logging_utils import log_image, log_summary, log_table
    from uqlora.metrics.plots import plot_reliability

    n_bins = int(cfg.eval.get("n_bins", 15))
    opts = sft_options(cfg)
    m, bins = token_metrics(p, n_bins)
    title = f"{cfg.method.name} / {cfg.model.name} / {cfg.data.name}: {split} (next-token)"
    if "sft_score" in p:
        for kind, key in (("gsm8k", "gsm8k_acc"), ("instruct", "rouge_l")):
            mask = p["sft_kind"] == kind
            if mask.any():
                m[key], m[f"{key}_n"] = float(p["sft_score"][mask].mean()), float(mask.sum())
        _write_answers(run_dir, split, p)
    if "gen_scores" in p:
        from uqlora.evaluation import _generation_metrics

        alpha = float((cfg.eval.get("prob") or {}).get("alpha", 0.05))
        m.update(_generation_metrics(cfg, run_dir, split, p, alpha, logger, title, score="exact_match"))
    if "feat" in p:
        value = silhouette(p, int(opts["silhouette_max_points"]), int(opts["seed"]))
        if value is not None:
            m["silhouette_source"] = value
    plot = plot_reliability(bins, run_dir / "plots" / f"reliability_{split}.png", title=title)
    log_image(logger, f"{split}/reliability", plot)
    rows = [[float(bins["edges"][i]), float(bins["edges"][i + 1]), float(bins["confidence"][i]),
             float(bins["accuracy"][i]), int(bins["count"][i])] for i in range(n_bins)]
    log_table(logger, f"{split}/calibration_table", ["bin_lo", "bin_hi", "confidence", "accuracy", "count"], rows)
    log_summary(logger, {f"{split}/{k}": v for k, v in m.items()})
    return m


def _write_answers(run_dir: Path, split: str, p: dict) -> None:
    texts = p.get("_sft_texts")
    if not texts:
        return
    lines = [json.dumps({"id": str(p["ids"][i]), "source": str(p["source"][i]), "kind": str(k),
                         "prompt": texts["prompts"][j], "reference": texts["references"][j],
                         "answer": texts["answers"][j], "score": float(s)})
             for j, (i, k, s) in enumerate(zip(p["sft_index"], p["sft_kind"], p["sft_score"]))]
    text = "\n".join(lines) + "\n"
    atomic_write(run_dir / "predictions" / f"{split}_answers.jsonl", lambda f: f.write(text.encode()))


def summary_line(split: str, m: dict) -> str | None:
    """The printed line of a generation split's answer metrics (None for other splits)."""
    if "n_tokens" not in m:
        return None
    parts = [f"token NLL {m['nll']:.3f} over {int(m['n_tokens'])} reference tokens"]
    per = [f"{k[4:]} {v:.3f}" for k, v in m.items() if k.startswith("nll_")]
    if per:
        parts[0] += f" ({', '.join(per)})"
    if "gsm8k_acc" in m:
        parts.append(f"GSM8K exact match {100 * m['gsm8k_acc']:.1f}% (greedy, n={int(m['gsm8k_acc_n'])})")
    if "rouge_l" in m:
        parts.append(f"ROUGE-L {m['rouge_l']:.3f} (greedy, n={int(m['rouge_l_n'])})")
    if "silhouette_source" in m:
        parts.append(f"silhouette by source {m['silhouette_source']:.3f}")
    return f"generation ({split}): " + "; ".join(parts)
