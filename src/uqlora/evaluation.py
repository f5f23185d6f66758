"""Probabilistic evaluation inside a run (``eval.probabilistic=true``, options under ``eval.prob``).

* :func:`generation_eval` -- causal LMs with ``eval.prob.generate=true``: for a seeded subset of a split's
  queries, ``gen_n_samples`` rounds; round ``r`` holds the method's weight draw ``s_r`` (uniform over its
  ``num_weight_samples()``: SWAG/Laplace/MC-dropout posterior samples; the point estimate otherwise) and
  samples one continuation per query (temperature / top-p / adaptive temperature), scored against the
  reference answer (the correct choice's text, or the label word) by ROUGE-L or exact match; plus one greedy
  continuation with the point-estimate weights.
* :func:`probabilistic_report` -- the bounds (:mod:`uqlora.metrics.probabilistic`, :mod:`uqlora.metrics.bounds`)
  into the split's metrics, per-query arrays into ``predictions/<split>_probabilistic.npz``, generations into
  ``predictions/<split>_generations.jsonl`` and a plot into ``plots/probabilistic_<split>.png``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from uqlora.data.prompts import DEFAULT_CLOZE_TEMPLATE, DEFAULT_TEMPLATE, answer_words, format_classification
from uqlora.io import atomic_npz, atomic_write
from uqlora.metrics.bounds import clopper_pearson, expectation_bounds, std_bounds
from uqlora.metrics.probabilistic import probabilistic_choice_eval
from uqlora.metrics.text import score_text

log = logging.getLogger(__name__)


def _prob_cfg(cfg) -> dict:
    """``eval.prob`` as a plain dict (runs made before these options existed have none: defaults apply)."""
    from omegaconf import OmegaConf

    p = cfg.eval.get("prob")
    return OmegaConf.to_container(p, resolve=True) if p is not None else {}


def _prompt_and_reference(rec: dict, dcfg, info) -> tuple[str, str]:
    prompt_cfg = dict(dcfg.get("prompt") or {})
    if "choices" in rec:
        template = prompt_cfg.get("cloze_template") or DEFAULT_CLOZE_TEMPLATE
        return template.format(question=rec["question"]), str(rec["choices"][int(rec["label"])])
    words = answer_words(prompt_cfg, info.task, info.num_classes, info.label_names)
    return (format_classification(rec, prompt_cfg.get("template") or DEFAULT_TEMPLATE),
            words[int(rec["label"])].strip())


def generation_eval(cfg, method, dm, split: str, member: int = 0, n_members: int = 1) -> dict:
    """Sampled and greedy free-text answers for a subset of ``split``: ``gen_scores [n_m, K]``,
    ``gen_greedy [K]``, ``gen_index [K]`` (positions in the split) and the texts (``_gen_texts``).

    With M members (ensembles, MultiSWAG) the n rounds are split by one seeded multinomial draw (each round's
    member uniform, as in the pooled predictive): member ``m`` generates its ``n_m`` rounds with its own
    random stream, and the pooled rounds are n i.i.d. draws from the mixture. The greedy answers are member
    0's point estimate."""
    from uqlora.models.generation import sample_continuations
    from uqlora.progress import track

    p = _prob_cfg(cfg)
    score = str(p.get("gen_score", "rouge_l"))  # values checked by uqlora.validate before the run starts
    n = int(p.get("gen_n_samples", 16))
    if n_members > 1:
        n = int(np.random.default_rng(int(p.get("seed", 0))).multinomial(n, [1.0 / n_members] * n_members)[member])
    recs = dm.records[split]
    k = p.get("gen_max_queries")
    rng = np.random.default_rng(int(p.get("seed", 0)))
    index = np.arange(len(recs)) if k is None or int(k) >= len(recs) else np.sort(rng.permutation(len(recs))[: int(k)])
    pairs = [_prompt_and_reference(recs[i], cfg.data, dm.info) for i in index]
    prompts, refs = [q for q, _ in pairs], [r for _, r in pairs]
    tok = dm.collator.tok
    backbone = method.backbone
    device = method.fit_device()
    backbone.to(device)
    was_training = backbone.training
    backbone.eval()
    bs = int(cfg.data.get("eval_batch_size", 32))
    gen = torch.Generator().manual_seed(int(p.get("seed", 0)) + 100_003 * member)
    kw = dict(max_new_tokens=int(p.get("gen_max_new_tokens", 16)), max_length=int(cfg.data.max_length),
              device=device, autocast=method.autocast(device))

    def run(temperature, top_p, thr=None, low=0.0):
        out = []
        for i in range(0, len(prompts), bs):
            out += sample_continuations(backbone, tok, prompts[i:i + bs], temperature=temperature, top_p=top_p,
                                        generator=gen, adaptive_threshold=thr, adaptive_low=low, **kw)
        return out

    S = max(1, int(method.num_weight_samples()))
    draws = np.random.default_rng([int(p.get("seed", 0)), member]).integers(S, size=n)
    try:
        greedy_texts = run(0.0, 1.0) if member == 0 else []
        texts = []
        for r in track(range(n), f"generating {n} x {len(prompts)} answers ({split})", method.progress_mode):
            with method.weight_sample(int(draws[r])):
                texts.append(run(float(p.get("gen_temperature", 1.0)), float(p.get("gen_top_p", 1.0)),
                                 p.get("adaptive_threshold"), float(p.get("adaptive_low", 0.0))))
    finally:
        backbone.train(was_training)
    scores = np.array([[score_text(t, ref, score) for t, ref in zip(row, refs)] for row in texts]).reshape(n, len(refs))
    greedy = np.array([score_text(t, ref, score) for t, ref in zip(greedy_texts, refs)])
    return {"gen_scores": scores, "gen_greedy": greedy, "gen_index": index,
            "_gen_texts": {"prompts": prompts, "references": refs, "greedy": greedy_texts, "samples": texts}}


def _plot(per_query: dict, greedy_value: float, bounds: tuple, path: Path, title: str, label: str) -> Path:
    from matplotlib.figure import Figure

    from uqlora.metrics.plots import _save_atomic

    order = np.argsort(per_query["mid"], kind="stable")
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(order.shape[0])
    g = per_query["greedy"][order] > 0.5
    for mask, colour, name in ((g, "tab:green", f"greedy {label} = 1"), (~g, "tab:red", f"greedy {label} = 0")):
        ax1.vlines(x[mask], per_query["lower"][order][mask], per_query["upper"][order][mask], colour, lw=1,
                   label=name)
    ax1.plot(x, per_query["mid"][order], "k.", ms=2, label="sampled estimate")
    ax1.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax1.set(xlabel="query (sorted)", ylabel=f"P({label}) / E[score]", ylim=(-0.02, 1.02),
            title="per-query bounds of the sampled answers")
    ax1.legend(fontsize=7, loc="upper left")
    ax2.hist(per_query["round_rate"], bins=20, color="tab:blue", alpha=0.7,
             label="one deployment (one answer per query)")
    lo, hi = bounds
    ax2.axvspan(lo, hi, color="tab:orange", alpha=0.3, label="bound on the expectation")
    ax2.axvline(greedy_value, color="k", ls="--", label="greedy")
    ax2.set(xlabel=f"dataset mean of {label}", ylabel="deployments", title="sampled vs greedy, dataset level")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save_atomic(fig, path)


def probabilistic_report(cfg, run_dir: Path, split: str, p: dict, logger) -> dict:
    """Metrics (``prob_*`` for the choice distribution, ``gen_*`` for free text) of one split; writes the
    per-query arrays, the generations and the plots."""
    from uqlora.logging_utils import log_image

    pc = _prob_cfg(cfg)
    alpha = float(pc.get("alpha", 0.05))
    title = f"{cfg.method.name} / {cfg.model.name} / {cfg.data.name}: {split}"
    m, q = probabilistic_choice_eval(
        p["probs"], p["labels"], p.get("samples"), n=int(pc.get("n_samples", 128)), alpha=alpha,
        seed=int(pc.get("seed", 0)), event=str(pc.get("event", "correct")),
        temperature=float(pc.get("temperature", 1.0)), adaptive_threshold=pc.get("adaptive_threshold"),
        adaptive_low=float(pc.get("adaptive_low", 0.0)))
    atomic_npz(run_dir / "predictions" / f"{split}_probabilistic.npz", ids=p["ids"], **q)
    q["mid"] = q["k"] / int(pc.get("n_samples", 128))
    label = str(pc.get("event", "correct"))
    plot = _plot(q, m["prob_greedy"], (m["prob_sampled_lower"], m["prob_sampled_upper"]),
                 run_dir / "plots" / f"probabilistic_{split}.png", title, label)
    log_image(logger, f"{split}/probabilistic", plot)
    if "gen_scores" in p:
        m.update(_generation_metrics(cfg, run_dir, split, p, alpha, logger, title))
    return m


def _generation_metrics(cfg, run_dir, split, p, alpha, logger, title, score: str | None = None) -> dict:
    """``gen_*`` bounds of sampled free-text scores; ``score`` (default ``eval.prob.gen_score``) names them."""
    from uqlora.logging_utils import log_image

    scores, greedy = np.asarray(p["gen_scores"], np.float64), np.asarray(p["gen_greedy"], np.float64)
    score = str(score or _prob_cfg(cfg).get("gen_score", "rouge_l"))
    binary = score == "exact_match"
    per_mean, lo, hi = expectation_bounds(scores.T, alpha, "two")
    if binary:  # exact for a binary score
        lo, hi = clopper_pearson(scores.sum(0).astype(int), scores.shape[0], alpha, "two")
    _, _, sd_hi = std_bounds(scores.T, alpha)
    rate = scores.mean(1)
    mean, e_lo, e_hi = expectation_bounds(rate, alpha, "two")
    sd, _, rsd_hi = std_bounds(rate, alpha)
    m = {"gen_n_queries": float(scores.shape[1]), "gen_n_samples": float(scores.shape[0]),
         "gen_greedy": float(greedy.mean()), "gen_sampled_mean": float(mean),
         "gen_sampled_lower": float(e_lo), "gen_sampled_upper": float(e_hi),
         "gen_sampled_std": float(sd), "gen_sampled_std_upper": float(rsd_hi),
         "gen_query_upper_mean": float(hi.mean()), "gen_query_lower_mean": float(lo.mean()),
         "gen_query_std_upper_mean": float(sd_hi.mean()),
         "gen_sampled_max_mean": float(scores.max(0).mean())}
    texts = p.get("_gen_texts")
    ids = p["ids"][p["gen_index"]]
    atomic_npz(run_dir / "predictions" / f"{split}_generation.npz", ids=ids, scores=scores, greedy=greedy,
               lower=lo, upper=hi, std_upper=sd_hi)
    if texts:
        lines = [json.dumps({"id": str(i), "prompt": texts["prompts"][j], "reference": texts["references"][j],
                             "greedy": texts["greedy"][j], "greedy_score": float(greedy[j]),
                             "samples": [row[j] for row in texts["samples"]],
                             "scores": [float(s) for s in scores[:, j]],
                             "bound": [float(lo[j]), float(hi[j])]})
                 for j, i in enumerate(ids)]
        text = "\n".join(lines) + "\n"
        atomic_write(run_dir / "predictions" / f"{split}_generations.jsonl", lambda f: f.write(text.encode()))
    q = {"mid": per_mean, "lower": lo, "upper": hi, "greedy": greedy, "round_rate": rate}
    plot = _plot(q, m["gen_greedy"], (e_lo, e_hi), run_dir / "plots" / f"generation_{split}.png",
                 title + f" (free text, {score})", score)
    log_image(logger, f"{split}/generation", plot)
    return m
