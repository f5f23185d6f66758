"""``method=ual``: uncertainty-aware label smoothing (Wang et al. 2024, "Uncertainty Aware Learning for Language
Model Alignment").

Training minimises the label-smoothed cross-entropy with a per-example smoothing value eps_i set from that
example's uncertainty u_i in [0, 1]:

    loss_i = (1 - eps_i) * (-log p_y) + eps_i * mean_{c != y}(-log p_c)      (mean over the other valid classes)

i.e. the cross-entropy against the target 1 - eps_i on the true class and eps_i / (C - 1) on each other valid
class, as the authors' code smooths over the V - 1 other tokens of the vocabulary (``method.smoothing_target=
others``, the default). ``smoothing_target=uniform``: standard label smoothing (``loss.label_smoothing``, the
baseline), eps_i / C on every valid class, so the true class keeps 1 - eps_i + eps_i / C (C = 2, eps = 0.3:
0.85 instead of 0.70). Masked (padded) choices get no mass under either.

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
  score and the training ids, so it is computed once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from uqlora.core.adue import normalized_entropy, sr_uncertainty
from uqlora.errors import UqloraError
from uqlora.methods import register
from uqlora.methods.base import UQMethod, smoothed_cross_entropy

log = logging.getLogger(__name__)
SOURCES = ("column", "teacher")
MAPPINGS = ("mean_scaled", "linear")
TEACHER_SCORES = ("entropy", "sr")
TARGETS = ("others", "uniform")


@dataclass
class UALConfig:
    name: str = "ual"
    uncertainty_source: str = "teacher"  # column | teacher
    teacher_run: Optional[str] = None    # run directory whose predictive gives u (source=teacher)
    teacher_score: str = "entropy"       # entropy | sr
    mapping: str = "mean_scaled"         # mean_scaled (authors' code) | linear
    eps_mean: float = 0.1                # mean_scaled: mean smoothing over the training set
    eps_cap: float = 0.99                # mean_scaled: largest eps
    eps_min: float = 0.0                 # linear
    eps_max: float = 0.3                 # linear
    smoothing_target: str = "others"     # others: 1 - eps on the true class (authors' code) | uniform: eps / C on all
    cache_dir: Optional[str] = None      # teacher cache; null: $UQLORA_CACHE_DIR or ~/.cache/uqlora


def map_uncertainty(u: np.ndarray, mapping: str, eps_mean: float = 0.1, eps_cap: float = 0.99,
                    eps_min: float = 0.0, eps_max: float = 0.3) -> np.ndarray:
    """Per-example smoothing from uncertainties in [0, 1] (see the module docstring)."""
    u = np.asarray(u, dtype=np.float64)
    if u.size == 0 or not np.isfinite(u).all() or u.min() < 0 or u.max() > 1:
        raise UqloraError("UAL uncertainties must be finite values in [0, 1]")
    if mapping == "linear":
        if not 0.0 <= eps_min <= eps_max < 1.0:
            raise UqloraError(f"method.eps_min/eps_max must satisfy 0 <= eps_min <= eps_max < 1, got {eps_min}, {eps_max}")
        return eps_min + (eps_max - eps_min) * u
    if mapping != "mean_scaled":
        raise UqloraError(f"unknown method.mapping '{mapping}'; valid choices: {', '.join(MAPPINGS)}")
    if not 0.0 <= eps_mean <= eps_cap < 1.0:
        raise UqloraError(f"method.eps_mean/eps_cap must satisfy 0 <= eps_mean <= eps_cap < 1, got {eps_mean}, {eps_cap}")
    if eps_mean == 0.0:
        return np.zeros_like(u)
    if u.mean() <= 0:  # no example is uncertain: nothing to rank by, smooth uniformly
        return np.full_like(u, eps_mean)
    eps = u.copy()
    for _ in range(1000):
        eps = np.minimum(eps / eps.mean() * eps_mean, eps_cap)
        if abs(eps.mean() - eps_mean) < 1e-3:
            break
    return eps


def ual_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, eps: float | torch.Tensor,
                      choice_mask: torch.Tensor | None = None, target: str = "others") -> torch.Tensor:
    """Batch mean of the cross-entropy against each example's smoothed target (module docstring): ``others``
    puts 1 - eps on the true class and eps / (C - 1) on each other valid class (one valid class: plain NLL);
    ``uniform`` is :func:`smoothed_cross_entropy`. ``eps``: a scalar or per-example [B]."""
    if target == "uniform":
        return smoothed_cross_entropy(logits, labels, eps, choice_mask)
    if target != "others":
        raise UqloraError(f"unknown method.smoothing_target '{target}'; valid choices: {', '.join(TARGETS)}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = torch.ones_like(logp) if choice_mask is None else choice_mask.to(logp.dtype).clone()
    others.scatter_(1, labels.unsqueeze(1), 0.0)
    n_others = others.sum(1)
    smooth = -(logp * others).sum(1) / n_others.clamp(min=1.0)
    eps = torch.as_tensor(eps, dtype=logp.dtype, device=logp.device) * (n_others > 0)
    return ((1 - eps) * nll + eps * smooth).mean()


def _cache_root(c) -> Path:
    from uqlora.models.loading import cache_dir

    return (Path(c.cache_dir).expanduser() if c.get("cache_dir") else cache_dir()) / "ual"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "-"


def teacher_identity(teacher_run: str, score: str, data_name: str, ids: list[str]) -> dict:
    from uqlora.pipeline import member_dirs

    src = Path(teacher_run).resolve()
    members = [{"adapter": _file_digest(d / "checkpoints" / "adapter.pt"),
                "method_state": _file_digest(d / "checkpoints" / "method_state.pt")} for d in member_dirs(src)]
    return {"teacher_run": str(src), "members": members, "score": score, "data": data_name,
            "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def teacher_uncertainty(c, cfg, records: list[dict], work_dir: Path) -> tuple[np.ndarray, dict]:
    """u_i of ``records`` from the teacher run's predictive, read from the cache when present."""
    from uqlora.io import atomic_json
    from uqlora.pipeline import run_predictions

    if not c.teacher_run:
        raise UqloraError("method=ual with uncertainty_source=teacher needs method.teacher_run=<run directory>; "
                          "or use uncertainty_source=column")
    if c.teacher_score not in TEACHER_SCORES:
        raise UqloraError(f"unknown method.teacher_score '{c.teacher_score}'; valid choices: {', '.join(TEACHER_SCORES)}")
    ids = [str(r["id"]) for r in records]
    ident = teacher_identity(str(c.teacher_run), c.teacher_score, str(cfg.data.name), ids)
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_root(c) / f"{cfg.data.name}-{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("identity") == ident and cached.get("ids") == ids:
            log.info("UAL: teacher uncertainties read from %s", path)
            return np.asarray(cached["u"], dtype=np.float64), {"teacher_cache": str(path), "teacher_cache_hit": True}
    log.info("UAL: evaluating teacher %s on %d training examples", c.teacher_run, len(records))
    pred = run_predictions(c.teacher_run, cfg, records, work_dir)
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
        if c.uncertainty_source not in SOURCES:
            raise UqloraError(f"unknown method.uncertainty_source '{c.uncertainty_source}'; valid choices: "
                              f"{', '.join(SOURCES)}")
        map_uncertainty(np.array([0.5]), c.mapping, float(c.eps_mean), float(c.eps_cap), float(c.eps_min),
                        float(c.eps_max))  # validate the options before any training
        if c.smoothing_target not in TARGETS:
            raise UqloraError(f"unknown method.smoothing_target '{c.smoothing_target}'; valid choices: "
                              f"{', '.join(TARGETS)}")
        if self.label_smoothing:
            raise UqloraError(f"method=ual sets the smoothing per example; loss.label_smoothing must be 0, got "
                              f"{self.label_smoothing}")
        self.cfg_full = cfg
        self.tuning: dict = {}

    def prepare_fit(self, datamodule) -> None:
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
            with tempfile.TemporaryDirectory() as work, torch.random.fork_rng(devices=[]):
                u, info = teacher_uncertainty(c, self.cfg_full, records, Path(work))
            random.setstate(py_state)
            np.random.set_state(np_state)
        eps = map_uncertainty(u, c.mapping, float(c.eps_mean), float(c.eps_cap), float(c.eps_min), float(c.eps_max))
        datamodule.records["train"] = [dict(r, label_smoothing=float(e)) for r, e in zip(records, eps)]
        self.tuning = {**info, "u_mean": float(u.mean()), "u_std": float(u.std()), "eps_mean": float(eps.mean()),
                       "eps_min": float(eps.min()), "eps_max": float(eps.max())}
        log.info("UAL: label smoothing per example: mean %.3f, range [%.3f, %.3f]", eps.mean(), eps.min(), eps.max())
        super().prepare_fit(datamodule)  # the entropy-subset flags, when loss.entropy_* is set

    def loss(self, logits, batch):
        if "label_smoothing" not in batch:
            raise UqloraError("UAL training batch without per-example label_smoothing (prepare_fit did not run)")
        return ual_cross_entropy(logits, batch["labels"], batch["label_smoothing"].to(logits.device),
                                 batch.get("choice_mask"), self.mcfg.smoothing_target) + self.entropy_term(logits, batch)
