"""``method=ual``: uncertainty-aware label smoothing (Wang et al. 2024, "Uncertainty Aware Learning for Language
Model Alignment").

Training minimises the label-smoothed cross-entropy with a per-example smoothing value eps_i set from that
example's uncertainty u_i in [0, 1]:

    loss_i = (1 - eps_i) * (-log p_y) + eps_i * mean_c(-log p_c)      (mean over the valid classes)

Mapping u -> eps (``method.mapping``):

* ``mean_scaled`` (default; what the authors' released code does -- the paper's text gives no formula we
  could check): eps_i proportional to u_i, rescaled so that the mean over the training set is
  ``eps_mean``, capped at ``eps_cap``; rescale-and-cap is repeated until the mean is within 1e-3 of
  ``eps_mean``. All u_i equal -> eps_i = eps_mean for everyone, i.e. plain label smoothing.
* ``linear``: eps_i = eps_min + (eps_max - eps_min) * u_i.

Differences from the authors' code: there the smoothing mass goes to the V-1 other tokens of a language-model
vocabulary (true token 1 - eps); here, as in standard label smoothing (``loss.label_smoothing``, the
baseline), it is spread uniformly over all valid classes (true class 1 - eps + eps/C).

Where u_i comes from (``method.uncertainty_source``):

* ``column``: the record's ``uncertainty`` field (custom datasets: ``data.options.uncertainty_column``);
* ``teacher``: the predictive of another run directory (``method.teacher_run``: a larger model, an
  ensemble, a SWAG run, ...) on this run's training examples, turned into [0, 1] by ``teacher_score``
  (``entropy``: entropy / log C; ``sr``: (1 - max p) / (1 - 1/C)). The paper elicits u_i from a stronger
  LLM; this is how to do that with any model one can run. It is cached under
  ``<cache_dir>/ual/<dataset>-<key>.json``, the key hashing the teacher's adapters and method states, the
  score and the training ids, so it is computed once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from uqlora.core.scores import normalized_entropy, sr_uncertainty
from uqlora.core.ual import map_uncertainty
from uqlora.errors import UqloraError
from uqlora.methods import register
from uqlora.methods.base import UQMethod, smoothed_cross_entropy
from uqlora.schema import HALF_OPEN_UNIT, Choice, MethodConfig, rule

log = logging.getLogger(__name__)


class Source(Choice):
    column = "column"
    teacher = "teacher"


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
    uncertainty_source: Source = Source.teacher  # column | teacher
    teacher_run: Optional[str] = None    # run directory whose predictive gives u (source=teacher)
    teacher_score: TeacherScore = TeacherScore.entropy  # entropy | sr
    mapping: Mapping = Mapping.mean_scaled  # mean_scaled (authors' code) | linear
    eps_mean: float = rule(0.1, HALF_OPEN_UNIT)   # mean_scaled: mean smoothing over the training set
    eps_cap: float = rule(0.99, HALF_OPEN_UNIT)   # mean_scaled: largest eps
    eps_min: float = rule(0.0, HALF_OPEN_UNIT)    # linear
    eps_max: float = rule(0.3, HALF_OPEN_UNIT)    # linear
    cache_dir: Optional[str] = None      # teacher cache; null: $UQLORA_CACHE_DIR or ~/.cache/uqlora


def _cache_root(c) -> Path:
    from uqlora.models.loading import cache_dir

    return (Path(c.cache_dir).expanduser() if c.get("cache_dir") else cache_dir()) / "ual"


def teacher_identity(runs, teacher_run: str, score: str, data_name: str, ids: list[str]) -> dict:
    return {"teacher_run": str(Path(teacher_run).resolve()), "members": runs.fingerprint(teacher_run),
            "score": str(score), "data": data_name, "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def teacher_uncertainty(c, cfg, records: list[dict], runs) -> tuple[np.ndarray, dict]:
    """u_i of ``records`` from the teacher run's predictive (``runs``: a :class:`uqlora.sources.RunAccess`),
    read from the cache when present."""
    from uqlora.io import atomic_json

    if not c.teacher_run:
        raise UqloraError("method=ual with uncertainty_source=teacher needs method.teacher_run=<run directory>; "
                          "or use uncertainty_source=column")
    ids = [str(r["id"]) for r in records]
    ident = teacher_identity(runs, str(c.teacher_run), c.teacher_score, str(cfg.data.name), ids)
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_root(c) / f"{cfg.data.name}-{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("identity") == ident and cached.get("ids") == ids:
            log.info("UAL: teacher uncertainties read from %s", path)
            return np.asarray(cached["u"], dtype=np.float64), {"teacher_cache": str(path), "teacher_cache_hit": True}
    log.info("UAL: evaluating teacher %s on %d training examples", c.teacher_run, len(records))
    pred = runs.predictions(c.teacher_run, records)
    probs = torch.as_tensor(pred["probs"], dtype=torch.float64)
    C = probs.shape[1]
    n_valid = torch.tensor([len(r["choices"]) if "choices" in r else C for r in records])
    mask = torch.arange(C).unsqueeze(0) < n_valid.unsqueeze(1)
    u = (normalized_entropy if c.teacher_score == "entropy" else sr_uncertainty)(probs, mask).clamp(0, 1).numpy()
    atomic_json({"identity": ident, "ids": ids, "u": [float(x) for x in u]}, path)
    return u, {"teacher_cache": str(path), "teacher_cache_hit": False}


@register("ual", UALConfig)
class UALMethod(UQMethod):
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
        return smoothed_cross_entropy(logits, batch["labels"], batch["label_smoothing"].to(logits.device),
                                      batch.get("choice_mask")) + self.entropy_term(logits, batch)
