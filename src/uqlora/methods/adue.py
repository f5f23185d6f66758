"""``method=adue``: the AdUE uncertainty head (Zabolotnyi et al. 2025) on a frozen fine-tuned LoRA model.

Trains MAP (or loads ``method.map_run``), caches the head's input features of the fit and validation
splits once, trains the SmoothMax head (:mod:`uqlora.core.adue`) over a small grid selected by validation
error-detection ROC-AUC, and fits the Mahalanobis baseline on the train features. Predictions are the
fine-tuned model's, unchanged; every evaluated split also gets per-example uncertainties

    u_adue (AdUE), u_sr (softmax response), u_entropy (normalised entropy), u_mahalanobis

saved in ``predictions/<split>.npz`` and scored as misclassification detectors (``errdet_<score>_auroc``,
``_auprc``, ``_aurc``; ``_ece`` for the probability-valued u_adue / u_sr) in ``results.json``, with a
risk-coverage plot per split.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List

import torch

from uqlora.core.adue import AdUEHead, Cached, Mahalanobis, grid_search
from uqlora.core.scores import normalized_entropy, sr_uncertainty
from uqlora.errors import UqloraError
from uqlora.methods import register
from uqlora.methods.posthoc import PostHocConfig, PostHocMethod
from uqlora.schema import POSITIVE_LIST, Choice, at_least, positive, rule

log = logging.getLogger(__name__)


class Split(Choice):
    train = "train"
    calib = "calib"
    val = "val"


@dataclass
class AdUEGrid:
    lr: List[float] = rule([1e-3, 1e-4, 1e-5], POSITIVE_LIST)
    alpha_reg: List[float] = rule([0.01, 0.1, 1.0], POSITIVE_LIST)
    alpha_l2sp: List[float] = rule([0.01, 0.1, 1.0], POSITIVE_LIST)


@dataclass
class AdUEConfig(PostHocConfig):
    name: str = "adue"
    display_name: str = "AdUE"
    lam: float = positive(100.0)       # SmoothMax sharpness (paper: 100)
    fit_split: Split = Split.train     # train (the paper) | calib | val
    select_split: Split = Split.val    # early stopping and grid selection
    grid: AdUEGrid = field(default_factory=AdUEGrid)
    epochs: int = at_least(1, 50)
    patience: int = at_least(1, 5)
    batch_size: int = at_least(1, 128)
    balanced: bool = True              # class-balanced (error / correct) sampling
    mahalanobis: bool = True           # fit the Mahalanobis baseline on the train features
    seed: int = 0


@register("adue", AdUEConfig)
class AdUEMethod(PostHocMethod):
    probability_scores = ("adue", "sr")  # u_adue, u_sr are probabilities of error: their ECE is reported

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        if self.mcfg.fit_split == self.mcfg.select_split:
            raise UqloraError(f"method.fit_split and method.select_split are both '{self.mcfg.fit_split}'; "
                              "early stopping needs held-out data")
        self.multiple_choice = _is_multiple_choice(cfg)  # Mahalanobis: one Gaussian (labels are positions)
        self.head: AdUEHead | None = None
        self.maha: Mahalanobis | None = None
        self.tuning: dict = {}

    # --- fitting ------------------------------------------------------------------------------------------
    def _init_head(self) -> AdUEHead:
        bb, lam = self.backbone, float(self.mcfg.lam)
        kind = bb.head_kind
        if kind == "classifier":
            return AdUEHead("linear", lam, weight=bb.head.weight, bias=bb.head.bias)
        if kind == "lm_choices":
            return AdUEHead("linear", lam, weight=bb.answer_rows, bias=bb.answer_bias)
        if kind in ("lm_cloze", "mc_classifier"):  # per-choice features [B, C, d]: the residual head
            return AdUEHead("residual", lam, dim=bb.hidden_size)
        raise UqloraError(f"method=adue does not support head '{kind}'; valid choices: classifier, mc_classifier, "
                          "lm_choices, lm_cloze")

    @torch.no_grad()
    def extract(self, datamodule, split: str) -> Cached:
        """Features, logits, choice mask and labels of a split, from one eval-mode pass (cached by the caller)."""
        feats, logits, masks, labels = [], [], [], []
        for batch in self.batches(datamodule.loader(split), f"AdUE: features of {split}"):
            z, f = self.backbone.logits_with_features(batch)
            feats.append(f.float().cpu())
            logits.append(z.float().cpu())
            labels.append(batch["labels"].cpu())
            if batch.get("choice_mask") is not None:
                masks.append(batch["choice_mask"].bool().cpu())
        return Cached(torch.cat(feats), torch.cat(logits), torch.cat(masks) if masks else None, torch.cat(labels))

    def _maha_features(self, feats: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if feats.dim() == 3:  # cloze: mean of the choices' features
            w = torch.ones(feats.shape[:2]) if mask is None else mask.float()
            return (feats * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1.0)
        return feats

    def fit(self, datamodule) -> None:
        c = self.mcfg
        self._require_split(datamodule, str(c.select_split))
        train = self.extract(datamodule, str(c.fit_split))
        val = self.extract(datamodule, str(c.select_split))
        n_err = int(train.errors.sum())
        if n_err == 0 or n_err == len(train):
            log.warning("AdUE: the fine-tuned model is %s on all %d %s examples; the head learns from one class only",
                        "right" if n_err == 0 else "wrong", len(train), c.fit_split)
        head, records, best = grid_search(self._init_head(), train, val, c.grid.lr, c.grid.alpha_reg, c.grid.alpha_l2sp,
                                    progress=self.progress_mode, epochs=int(c.epochs), patience=int(c.patience),
                                    batch_size=int(c.batch_size), balanced=bool(c.balanced), seed=int(c.seed))
        self.head = head.eval()
        self.tuning = {"n_fit": len(train), "fit_errors": n_err, "n_select": len(val),
                       "select_errors": int(val.errors.sum()), "lr": best["lr"], "alpha_reg": best["alpha_reg"],
                       "alpha_l2sp": best["alpha_l2sp"], "val_auroc": best["val_auroc"],
                       "best_epoch": best["best_epoch"], "grid": records}
        if c.mahalanobis:
            src = train if c.fit_split == "train" else self.extract(datamodule, "train")
            labels = None if self.multiple_choice else src.labels
            self.maha = Mahalanobis.fit(self._maha_features(src.feats, src.mask), labels)
        log.info("AdUE: head lr=%g alpha_reg=%g alpha_l2sp=%g, val error ROC-AUC %.4f (%d/%d errors)", best["lr"],
                 best["alpha_reg"], best["alpha_l2sp"], best["val_auroc"], self.tuning["select_errors"], len(val))

    # --- predictive -----------------------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        if self.head is None:
            raise UqloraError("AdUE predictive before the head was fitted or loaded")
        logits, feats = self.backbone.logits_with_features(batch)
        logits, mask = logits.float(), batch.get("choice_mask")
        probs = logits.softmax(-1)
        head = self.head.to(logits.device)
        out = {"probs": probs, "labels": batch["labels"],
               "u_adue": head(feats.float(), logits, mask),
               "u_sr": sr_uncertainty(probs, mask),
               "u_entropy": normalized_entropy(probs, mask)}
        if self.maha is not None:
            out["u_mahalanobis"] = self.maha.score(self._maha_features(feats.float().cpu(),
                                                                       None if mask is None else mask.cpu())).float()
        return {k: v.float().cpu() if k != "labels" else v for k, v in out.items()}

    # --- persistence ------------------------------------------------------------------------------------------
    def fitted_state(self):
        state = {"head_config": self.head.config(), "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
                 "theta0": {k: v.cpu() for k, v in self.head.theta0.items()},
                 "tuning": {k: v for k, v in self.tuning.items() if k != "grid"}}
        if self.maha is not None:
            state["mahalanobis"] = self.maha.state_dict()
        return state

    def load_fitted_state(self, state):
        if "head" not in state:
            raise UqloraError("this run directory has no fitted AdUE head (checkpoints/method_state.pt)")
        self.head = AdUEHead.from_state(state["head_config"], state["head"], state["theta0"]).eval()
        m = state.get("mahalanobis")
        self.maha = None if m is None else Mahalanobis(m["means"], m["precision"])
        self.tuning = dict(state.get("tuning", {}))


def _is_multiple_choice(cfg) -> bool:
    from uqlora.data.datamodule import task_info

    return task_info(cfg.data).task == "multiple_choice"
