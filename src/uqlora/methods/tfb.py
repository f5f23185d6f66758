"""TFB: training-free Bayesianization of a finished LoRA adapter (Shi, Wang et al., NeurIPS 2025;
:mod:`uqlora.core.tfb`).

Post hoc on ``method.map_run`` (a finished MAP/MLE/BLoB run: its adapter, i.e. BLoB's mean) or on the MAP model
this run trains first. The posterior std of the SVD-rotated A' is sigma / d_i; sigma is the largest value in
[``low``, ``high``] whose anchor-set score change against sigma = 0 stays within ``tolerance``:

* ``criterion=nll``: |NLL(sigma) - NLL(0)| / NLL(0) of the sigma = 0 pseudo-labels (``labels=pseudo``, the
  paper) or of the true labels (``labels=true``); ``criterion=acc``: |acc(sigma) - acc(0)| (with pseudo-labels:
  the fraction of anchor predictions that flip, the official ``tfblora_acc``).
* bisection (:func:`uqlora.core.tfb.search_sigma`) with ``search_iters`` halvings; each sigma is scored with the
  same ``search_samples`` weight draws (seed ``seed``); ``sigma`` set: no search.
* ``search_stop_early`` (default): a sigma's pass over the anchors stops as soon as the anchors read so far prove
  the change beyond the tolerance (:func:`uqlora.core.tfb.change_lower_bound`: the NLL summed so far already
  exceeds (1 + tolerance) x NLL(0)'s sum, or the accuracy cannot come back within it) -- the same decisions and
  sigma as the full passes, with a lower bound recorded as that sigma's change. A large sigma is rejected after a
  fraction of the anchors (ARC-E, 128 anchors: 36% fewer anchor passes). One process only (DDP reads all).
* the anchor set: ``anchor_size`` examples of ``anchor_split`` (train; never test) drawn with ``seed``; under DDP
  each process scores its shard and the sums are gathered, so every process finds the same sigma.

The official code divides the relative NLL change by the anchor size (an effective tolerance of 0.003 x 500 =
1.5) and returns the last sigma that violated the tolerance (or the never-evaluated upper bound); this is the
paper's rule instead. Prediction as :mod:`uqlora.methods.blob` (``num_samples`` draws from ``eval_seed``).
The method state holds sigma and the SVD factors; ``eval.py`` reuses it without searching again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
from torch.utils.data import DataLoader

from uqlora import distributed as dist
from uqlora.core.blob import lora_layers
from uqlora.core.tfb import TFB, change_lower_bound, predictive_probs, score, search_sigma
from uqlora.errors import UqloraError
from uqlora.methods import register
from uqlora.methods.blob import SampledLoRA
from uqlora.methods.posthoc import PostHocConfig, PostHocMethod
from uqlora.schema import NON_NEGATIVE, Choice, at_least, optional, positive, rule

log = logging.getLogger(__name__)


class AnchorSplit(Choice):
    train = "train"
    val = "val"
    calib = "calib"


class Criterion(Choice):
    nll = "nll"
    acc = "acc"


class Labels(Choice):
    pseudo = "pseudo"
    true = "true"


@dataclass
class TFBConfig(PostHocConfig):
    name: str = "tfb"
    display_name: str = "TFB"
    anchor_split: AnchorSplit = AnchorSplit.train  # train (the paper) | val | calib -- never test
    anchor_size: int = at_least(1, 500)
    criterion: Criterion = Criterion.nll  # nll (relative change) | acc (absolute change)
    labels: Labels = Labels.pseudo        # pseudo (argmax at sigma = 0, the paper) | true
    tolerance: float = positive(0.003)
    low: float = positive(0.001)
    high: float = positive(0.2)
    search_iters: int = at_least(0, 5)
    search_samples: int = at_least(1, 10)  # weight draws scoring each sigma
    search_stop_early: bool = True         # stop a sigma's anchor pass once it is proven beyond the tolerance
    sigma: Optional[float] = rule(None, optional(NON_NEGATIVE))  # a fixed sigma (no search)
    num_samples: int = at_least(0, 10)     # weight draws at test time; 0: the mean (= the MAP model)
    eval_seed: int = 0
    seed: int = 0                          # anchor subset and search draws


@register("tfb", TFBConfig)
class TFBMethod(SampledLoRA, PostHocMethod):
    fit_split_key = "anchor_split"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        if not float(self.mcfg.low) < float(self.mcfg.high):
            raise UqloraError(f"method.low and method.high must satisfy low < high, got {self.mcfg.low}, {self.mcfg.high}")
        self.var: TFB | None = None
        self.tuning: dict = {}

    def _build(self, d=None, V=None) -> TFB:
        if self.var is not None:
            self.var.remove()
        self.var = TFB(lora_layers(self.backbone), d=d, V=V)
        self._draws = None
        return self.var

    # --- the search ---------------------------------------------------------------------------------------
    def anchor_loader(self, datamodule) -> DataLoader:
        """``anchor_size`` examples of ``anchor_split`` (sorted seeded subset), batched as that split's loader."""
        c = self.mcfg
        datamodule.setup()
        base = datamodule.loader(self.fit_split)
        records = datamodule.records[self.fit_split]
        k = min(int(c.anchor_size), len(records))
        idx = np.sort(np.random.default_rng(int(c.seed)).permutation(len(records))[:k])
        return DataLoader([records[i] for i in idx], batch_size=base.batch_size, collate_fn=base.collate_fn,
                          num_workers=base.num_workers)

    def fit(self, datamodule) -> None:
        c = self.mcfg
        var = self._build()
        if c.sigma is not None:
            var.sigma = float(c.sigma)
            self.tuning = {"sigma": var.sigma, "searched": 0}
        else:
            var.sigma = self._search(datamodule, self.fit_device())
        log.info("TFB: sigma = %g", var.sigma)

    def _search(self, datamodule, device) -> float:
        c, var = self.mcfg, self.var
        batches = list(self.batches(self.anchor_loader(datamodule), "TFB: anchor set", shard=True))

        def logits(batch):
            with self.autocast(device):
                return self.backbone.logits(batch)

        def totals(summed):  # (summed NLL, correct, count) of this process -> (mean NLL, accuracy, count) of all
            parts = dist.all_gather_object(summed)
            nll, correct, n = (sum(p[j] for p in parts) for j in range(3))
            if n == 0:
                raise UqloraError(f"the TFB anchor set ({c.anchor_split}) is empty")
            return nll / n, correct / n, n

        p0 = predictive_probs(logits, batches, var, [])
        targets = [p.argmax(-1) for p in p0] if c.labels == "pseudo" else [b["labels"].cpu() for b in batches]
        nll0, acc0, n_anchor = totals(score(p0, targets))
        draws = var.draws(int(c.search_samples), int(c.seed))

        evaluations = [0]
        most = int(c.search_iters) + 2  # high, the bisections, and low when nothing is within the tolerance
        early = bool(c.search_stop_early) and dist.world_size() == 1  # DDP: each process reads its whole shard
        read = []  # per evaluated sigma: the fraction of the anchors it read

        def change(sigma: float) -> float:
            from uqlora.progress import track

            var.sigma = sigma
            evaluations[0] += 1
            desc = f"TFB: sigma {sigma:.4g} (search {evaluations[0]}/<={most}, {len(draws)} draws)"
            nll, correct, n = 0.0, 0, 0
            for batch, y in track(list(zip(batches, targets)), desc, self.progress_mode):
                b_nll, b_correct, b_n = score(predictive_probs(logits, [batch], var, draws), [y])
                nll, correct, n = nll + b_nll, correct + b_correct, n + b_n
                bound = change_lower_bound(str(c.criterion), nll, correct, n, n_anchor, nll0, acc0) if early else 0.0
                if bound > float(c.tolerance):
                    read.append(n / n_anchor)
                    log.info("TFB search %d: sigma %.4g changes the anchor %s by more than %.4g (tolerance %g), "
                             "proven after %d of %d anchors", evaluations[0], sigma, c.criterion, bound,
                             float(c.tolerance), n, n_anchor)
                    return bound
            read.append(1.0)
            nll, acc, _ = totals((nll, correct, n))
            out = abs(nll - nll0) / max(nll0, 1e-12) if c.criterion == "nll" else abs(acc - acc0)
            log.info("TFB search %d: sigma %.4g changes the anchor %s by %.4g (tolerance %g)", evaluations[0], sigma,
                     c.criterion, out, float(c.tolerance))
            return out

        sigma, history = search_sigma(change, float(c.low), float(c.high), int(c.search_iters), float(c.tolerance))
        self.tuning = {"sigma": sigma, "searched": 1, "n_anchor": n_anchor, "anchor_nll0": nll0, "anchor_acc0": acc0,
            "search_sigmas": [h[0] for h in history], "search_changes": [h[1] for h in history],
            "search_anchors_read": read}
        return sigma

    # --- persistence ----------------------------------------------------------------------------------------
    def fitted_state(self):
        return {"method": "tfb", "names": list(self.var.names), **self.var.state(),
                "tuning": {k: v for k, v in self.tuning.items() if isinstance(v, (int, float, list))}}

    def load_fitted_state(self, state):
        if state.get("method") != "tfb":
            raise UqloraError("this run directory has no TFB state (checkpoints/method_state.pt)")
        names = [n for n, _ in lora_layers(self.backbone)]
        if list(state["names"]) != names:
            raise UqloraError(f"the saved TFB state covers other LoRA layers ({len(state['names'])}) than this model "
                              f"({len(names)})")
        var = self._build(d=state["d"], V=state["V"])
        var.check_adapter()
        var.sigma = float(state["sigma"])
        self.tuning = dict(state.get("tuning", {}))
