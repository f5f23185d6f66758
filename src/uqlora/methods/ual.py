"""``method=ual``: uncertainty-aware label smoothing (Wang et al. 2024, "Uncertainty Aware Learning for Language
Model Alignment").

Training minimises the label-smoothed cross-entropy with a per-example smoothing value eps_i set from that
example's uncertainty u_i in [0, 1]. The loss is one function for both settings (``smoothed_cross_entropy``
of :mod:`uqlora.methods.base`), over *rows* with a per-row eps:

* classification: a row is an example; with ``method.smoothing_target=others`` (default, the authors'
  target) loss_i = (1 - eps_i) * (-log p_y) + eps_i * mean_{c != y}(-log p_c), i.e. 1 - eps_i on the true
  class and eps_i / (C - 1) on each other valid class; ``uniform``: standard label smoothing (the baseline
  ``loss.label_smoothing``), eps_i / C on every valid class, so the true class keeps 1 - eps_i + eps_i / C
  (C = 2, eps = 0.3: 0.85 instead of 0.70). Masked (padded) choices get no mass under either;
* token-level SFT (generation data, head ``lm_sft``) -- the paper's own setting: a row is a target token of
  example i, with the authors' target: 1 - eps_i on the reference token and eps_i / (V - 1) on each of the
  V - 1 other vocabulary tokens (``others``; ``uniform``: eps_i / V on every token); every token of the
  example shares eps_i. The rows are averaged per example, then over examples (``loss.token_reduction=sample``,
  what the authors' micro-batches of one example do) or over all tokens (``token``). Uniform smoothing with
  the same target is ``method=map loss.label_smoothing=0.1``.

Mapping u -> eps (``method.mapping``):

* ``mean_scaled`` (default; what the authors' released code does -- the paper's text gives no formula we
  could check): eps_i proportional to u_i, rescaled so that the mean over the training set is
  ``eps_mean``, capped at ``eps_cap``; rescale-and-cap is repeated until the mean is within 1e-3 of
  ``eps_mean``. All u_i equal -> eps_i = eps_mean for everyone, i.e. plain label smoothing.
* ``linear``: eps_i = eps_min + (eps_max - eps_min) * u_i.

Where u_i comes from (``method.uncertainty_source``):

* ``column``: the record's ``uncertainty`` field (custom datasets: ``data.options.uncertainty_column``);
* ``teacher``: the predictive of another run directory (``method.teacher_run``: a larger model, an
  ensemble, a SWAG run, ...) on this run's training examples, turned into [0, 1] by ``teacher_score``
  (``entropy``: entropy / log C; ``sr``: (1 - max p) / (1 - 1/C)). The paper elicits u_i from a stronger
  LLM; this is how to do that with any model one can run. It is cached under
  ``<cache_dir>/ual/<dataset>-<key>.json``, the key hashing the teacher's adapters and method states, the
  score and the training ids, so it is computed once. On generation data the teacher's score of a sample
  is the mean over its reference answer's tokens of the teacher's next-token uncertainty under teacher
  forcing (``entropy``: entropy / log V; ``sr``: 1 - max p). Why this and not the teacher's own sampled
  answers or the disagreement of k of them: it is one forward pass per sample (no decoding of hundreds of
  tokens, k times, for thousands of training samples), deterministic (so the cache is exact), needs no
  answer-similarity measure for free text, and it measures the spread of the teacher's distribution on the
  very tokens the smoothing acts on: open-ended answers (role-play, creative writing) admit many
  continuations and get high entropy, worked math answers few. The prompt tokens count as targets when
  ``data.mask_prompt=false``, as in training.
* ``category``: a fixed score per data source (``method.category_scores``, source -> u in [0, 1]; records
  carry their ``source``): the coarse version of the paper's GPT-4 rating of each sample's need for
  diversity -- dialogue / creative sources high, math low. With ``mean_scaled`` only the ratios matter.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from uqlora.core.scores import normalized_entropy, sr_uncertainty
from uqlora.core.ual import map_uncertainty
from uqlora.errors import UqloraError
from uqlora.methods import register
from uqlora.methods.base import UQMethod, smoothed_cross_entropy
from uqlora.schema import HALF_OPEN_UNIT, UNIT, Choice, MethodConfig, rule

log = logging.getLogger(__name__)
# source=category: the coarse "need for diversity" of each data source (role-play / open-ended high, math low)
CATEGORY_SCORES = {"gsm8k": 0.1, "self_instruct": 0.5, "lima": 0.7, "gpteacher": 0.9}
SCORE_MAP = ((lambda d: isinstance(d, dict) and len(d) > 0 and all(UNIT[0](v) for v in d.values())),
             "a non-empty map data source -> score in [0, 1]")


class Source(Choice):
    column = "column"
    teacher = "teacher"
    category = "category"


class Target(Choice):
    others = "others"
    uniform = "uniform"


class TeacherScore(Choice):
    entropy = "entropy"
    sr = "sr"


class Mapping(Choice):
    mean_scaled = "mean_scaled"
    linear = "linear"


@dataclass
class UALConfig(MethodConfig):
    name: str = "ual"
    display_name: str = "UAL"
    uncertainty_source: Source = Source.teacher  # column | teacher | category
    teacher_run: Optional[str] = None    # run directory whose predictive gives u (source=teacher)
    teacher_score: TeacherScore = TeacherScore.entropy  # entropy | sr
    mapping: Mapping = Mapping.mean_scaled  # mean_scaled (authors' code) | linear
    eps_mean: float = rule(0.1, HALF_OPEN_UNIT)   # mean_scaled: mean smoothing over the training set
    eps_cap: float = rule(0.99, HALF_OPEN_UNIT)   # mean_scaled: largest eps
    eps_min: float = rule(0.0, HALF_OPEN_UNIT)    # linear
    eps_max: float = rule(0.3, HALF_OPEN_UNIT)    # linear
    smoothing_target: Target = Target.others  # others: 1 - eps on the true class (authors') | uniform: eps / C on all
    cache_dir: Optional[str] = None      # teacher cache; null: $UQLORA_CACHE_DIR or ~/.cache/uqlora
    category_scores: Dict[str, float] = rule(dict(CATEGORY_SCORES), SCORE_MAP)  # source=category: source -> u


def _cache_root(c) -> Path:
    from uqlora.models.loading import cache_dir

    return (Path(c.cache_dir).expanduser() if c.get("cache_dir") else cache_dir()) / "ual"


def teacher_identity(runs, teacher_run: str, score: str, data_name: str, ids: list[str], sft: dict | None = None) -> dict:
    out = {"teacher_run": str(Path(teacher_run).resolve()), "members": runs.fingerprint(teacher_run),
           "score": str(score), "data": data_name, "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest()}
    return out if sft is None else {**out, "sft": sft}  # generation: which tokens are scored


def sft_teacher_scores(pred: dict, score: str) -> np.ndarray:
    """Generation: the mean over each sample's target tokens of the teacher's normalised entropy or 1 - max p."""
    n = np.asarray(pred["n_tokens"], dtype=np.float64)
    if score == "entropy":
        return np.asarray(pred["nentropy_sum"], dtype=np.float64) / n
    ends = np.cumsum(n).astype(np.int64)
    doubt = 1.0 - np.asarray(pred["tok_conf"], dtype=np.float64)
    return np.add.reduceat(doubt, np.concatenate([[0], ends[:-1]])) / n


def category_uncertainty(scores, records: list[dict]) -> tuple[np.ndarray, dict]:
    """u_i = the score of record i's ``source`` (``method.category_scores``)."""
    scores = {str(k): float(v) for k, v in dict(scores).items()}
    missing = sorted({str(r.get("source")) for r in records if str(r.get("source")) not in scores})
    if missing:
        raise UqloraError(f"method.uncertainty_source=category: no score for source '{missing[0]}'; "
                          f"method.category_scores has {', '.join(sorted(scores))} (add +method.category_scores."
                          f"{missing[0]}=<u in [0, 1]>)")
    sources = [str(r["source"]) for r in records]
    return np.array([scores[s] for s in sources]), {"category_counts": {s: sources.count(s) for s in sorted(set(sources))}}


def teacher_uncertainty(c, cfg, records: list[dict], runs) -> tuple[np.ndarray, dict]:
    """u_i of ``records`` from the teacher run's predictive (``runs``: a :class:`uqlora.sources.RunAccess`),
    read from the cache when present."""
    from uqlora.io import atomic_json

    if not c.teacher_run:
        raise UqloraError("method=ual with uncertainty_source=teacher needs method.teacher_run=<run directory>; "
                          "or use uncertainty_source=column")
    ids = [str(r["id"]) for r in records]
    sft = ({"mask_prompt": bool(cfg.data.get("mask_prompt", True)), "max_length": int(cfg.data.max_length)}
           if records and "response" in records[0] else None)
    ident = teacher_identity(runs, str(c.teacher_run), c.teacher_score, str(cfg.data.name), ids, sft)
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_root(c) / f"{cfg.data.name}-{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("identity") == ident and cached.get("ids") == ids:
            log.info("UAL: teacher uncertainties read from %s", path)
            return np.asarray(cached["u"], dtype=np.float64), {"teacher_cache": str(path), "teacher_cache_hit": True}
    log.info("UAL: evaluating teacher %s on %d training examples", c.teacher_run, len(records))
    pred = runs.predictions(c.teacher_run, records)
    if "n_tokens" in pred:  # generation: token-level predictive of the reference answers
        u = np.clip(sft_teacher_scores(pred, str(c.teacher_score)), 0.0, 1.0)
        atomic_json({"identity": ident, "ids": ids, "u": [float(x) for x in u]}, path)
        return u, {"teacher_cache": str(path), "teacher_cache_hit": False}
    probs = torch.as_tensor(pred["probs"], dtype=torch.float64)
    C = probs.shape[1]
    n_valid = torch.tensor([len(r["choices"]) if "choices" in r else C for r in records])
    mask = torch.arange(C).unsqueeze(0) < n_valid.unsqueeze(1)
    u = (normalized_entropy if c.teacher_score == "entropy" else sr_uncertainty)(probs, mask).clamp(0, 1).numpy()
    atomic_json({"identity": ident, "ids": ids, "u": [float(x) for x in u]}, path)
    return u, {"teacher_cache": str(path), "teacher_cache_hit": False}


@register("ual", UALConfig)
class UALMethod(UQMethod):
    supports_generation = True  # token-level SFT (generation data)
    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        c = self.mcfg
        map_uncertainty(np.array([0.5]), str(c.mapping), float(c.eps_mean), float(c.eps_cap), float(c.eps_min),
                        float(c.eps_max))  # validate the options before any training
        if self.label_smoothing:
            raise UqloraError(f"method=ual sets the smoothing per example; loss.label_smoothing must be 0, got "
                              f"{self.label_smoothing}")
        self.cfg_full = cfg
        self.tuning: dict = {}

    def prepare_fit(self, datamodule, runs=None) -> None:
        c = self.mcfg
        datamodule.setup()
        records = datamodule.records["train"]
        if c.uncertainty_source == "column":
            missing = [r.get("id") for r in records if "uncertainty" not in r]
            if missing:
                raise UqloraError(f"method.uncertainty_source=column: {len(missing)} training records (e.g. "
                                  f"'{missing[0]}') have no 'uncertainty' field; set data.options.uncertainty_column "
                                  "on a custom dataset, or use uncertainty_source=teacher")
            u, info = np.array([float(r["uncertainty"]) for r in records]), {}
        elif c.uncertainty_source == "category":
            u, info = category_uncertainty(c.category_scores, records)
        else:
            # building/evaluating the teacher reseeds the global RNGs: restore them, so that a run that reads
            # the cache and one that computes it train identically
            py_state, np_state = random.getstate(), np.random.get_state()
            if runs is None:
                raise UqloraError("method=ual with uncertainty_source=teacher needs access to the teacher run "
                                  "(prepare_fit(datamodule, runs))")
            with torch.random.fork_rng(devices=[]):
                u, info = teacher_uncertainty(c, self.cfg_full, records, runs)
            random.setstate(py_state)
            np.random.set_state(np_state)
        eps = map_uncertainty(u, str(c.mapping), float(c.eps_mean), float(c.eps_cap), float(c.eps_min), float(c.eps_max))
        datamodule.records["train"] = [dict(r, label_smoothing=float(e)) for r, e in zip(records, eps)]
        self.tuning = {**info, "u_mean": float(u.mean()), "u_std": float(u.std()), "eps_mean": float(eps.mean()),
                       "eps_min": float(eps.min()), "eps_max": float(eps.max())}
        log.info("UAL: label smoothing per example: mean %.3f, range [%.3f, %.3f]", eps.mean(), eps.min(), eps.max())
        super().prepare_fit(datamodule, runs)  # the entropy-subset flags, when loss.entropy_* is set

    def loss(self, logits, batch):
        if "label_smoothing" not in batch:
            raise UqloraError("UAL training batch without per-example label_smoothing (prepare_fit did not run)")
        args = {**self.row_loss_args(batch), "others_only": str(self.mcfg.smoothing_target) == "others"}
        return smoothed_cross_entropy(logits, batch["labels"], batch["label_smoothing"].to(logits.device),
                                      batch.get("choice_mask"), **args) + self.entropy_term(logits, batch)
