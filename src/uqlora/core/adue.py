"""AdUE (Zabolotnyi et al. 2025, "AdUE: Improving uncertainty estimation head for LoRA adapters in LLMs").

A post-hoc uncertainty head on the frozen fine-tuned model; the model's predictions never change.

* Features: the final hidden state at the head's position, cached once per split (``[N, d]``; for the cloze
  head, the last hidden state of each choice's sequence ``[N, C, d]``).
* Head: a copy of the fine-tuned linear head (classifier, or the answer-token rows of the LM head) followed
  by SmoothMax::

      p = softmax(W h + b),   u = (1 - (1/lambda) * logsumexp(lambda * p)) / (1 - 1/C),   clamped to [eps, 1-eps]

  ``(1/lambda) logsumexp(lambda p)`` is a smooth upper bound on ``max p`` (tight as lambda -> inf), so u
  starts from the softmax response ``u_SR = (1 - max p) / (1 - 1/C)`` and stays differentiable. With padded
  choices only the valid ones enter (C = their number). The cloze head has no linear head to copy; there
  the head is ``a * z_c + w^T f_c`` on the original choice scores z_c and per-choice features f_c, starting
  at ``a = 1, w = 0`` so that it too starts from exactly the original predictive (our extension).
* Loss: ``BCE(u, 1[argmax original != y]) + alpha_reg * mean((u - u_SR)^2) + alpha_l2sp * ||theta - theta_0||^2``
  (the squared L2-SP distance summed over the head's parameters, as the official code does).
* Training: class-balanced sampling of errors vs correct predictions (``WeightedRandomSampler``), Adam with
  a one-cycle cosine schedule (pct_start 0.1, div_factor 25, final_div_factor 1e4), early stopping on the
  validation error-detection ROC-AUC (patience 5, best epoch restored); a grid over (lr, alpha_reg,
  alpha_l2sp) selected by validation ROC-AUC.

Baseline: :class:`Mahalanobis` -- class-conditional Gaussians with one shared covariance fitted on the train
features (float64), score ``min_c (x - mu_c)^T Sigma^-1 (x - mu_c)``.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from uqlora.core.scores import sr_uncertainty, valid_count
from uqlora.errors import UqloraError

EPS = 1e-8


def smoothmax_uncertainty(probs: torch.Tensor, lam: float, mask: torch.Tensor | None = None,
                          eps: float = EPS) -> torch.Tensor:
    """``(1 - logsumexp(lam * p) / lam) / (1 - 1/C)`` over the valid entries, clamped to ``[eps, 1 - eps]``."""
    z = lam * probs
    if mask is not None:
        z = z.masked_fill(~mask.bool(), float("-inf"))
    smooth_max = torch.logsumexp(z, dim=-1) / lam
    return ((1 - smooth_max) / (1 - 1 / valid_count(probs, mask))).clamp(eps, 1 - eps)


class AdUEHead(nn.Module):
    """``kind="linear"``: logits = h W^T + b from copies of the fine-tuned head. ``kind="residual"`` (cloze):
    logits = a * z + f w (per choice). ``forward`` returns the SmoothMax uncertainty u [N]."""

    def __init__(self, kind: str, lam: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 dim: int | None = None):
        super().__init__()
        if kind not in ("linear", "residual"):
            raise UqloraError(f"unknown AdUE head kind '{kind}'; valid choices: linear, residual")
        if lam <= 0:
            raise UqloraError(f"method.lam must be > 0, got {lam}")
        self.kind, self.lam = kind, float(lam)
        if kind == "linear":
            self.weight = nn.Parameter(weight.detach().clone().float())
            self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())
        else:
            self.scale = nn.Parameter(torch.ones(()))
            self.weight = nn.Parameter(torch.zeros(int(dim)))
        self.theta0 = {n: p.detach().clone() for n, p in self.named_parameters()}

    def logits(self, feats: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        feats = feats.float()
        if self.kind == "linear":
            z = feats @ self.weight.T + (0 if self.bias is None else self.bias)
        else:
            z = self.scale * base_logits.float() + feats @ self.weight
        return z if mask is None else z.masked_fill(~mask.bool(), -1e4)

    def forward(self, feats, base_logits, mask=None) -> torch.Tensor:
        p = self.logits(feats, base_logits, mask).softmax(-1)
        return smoothmax_uncertainty(p, self.lam, mask)

    def l2sp(self) -> torch.Tensor:
        return sum(((p - self.theta0[n].to(p.device)) ** 2).sum() for n, p in self.named_parameters())

    def config(self) -> dict:
        return {"kind": self.kind, "lam": self.lam, "dim": int(self.weight.shape[-1]),
                "bias": self.kind == "linear" and self.bias is not None}

    @classmethod
    def from_state(cls, config: dict, state: dict, theta0: dict) -> "AdUEHead":
        if config["kind"] == "linear":
            head = cls("linear", config["lam"], weight=state["weight"],
                       bias=state.get("bias") if config["bias"] else None)
        else:
            head = cls("residual", config["lam"], dim=config["dim"])
        head.load_state_dict(state)
        head.theta0 = {n: t.clone() for n, t in theta0.items()}
        return head


def adue_loss(head: AdUEHead, feats, base_logits, mask, errors, alpha_reg: float, alpha_l2sp: float):
    """BCE(u, error) + alpha_reg * mean((u - u_SR)^2) + alpha_l2sp * ||theta - theta_0||^2; also returns u."""
    u = head(feats, base_logits, mask)
    u_sr = sr_uncertainty(base_logits.float().softmax(-1), mask)
    loss = F.binary_cross_entropy(u, errors.float()) + alpha_reg * ((u - u_sr) ** 2).mean() + alpha_l2sp * head.l2sp()
    return loss, u


@dataclass
class Cached:
    """Features, original logits, choice mask and labels of one split (CPU tensors)."""
    feats: torch.Tensor
    logits: torch.Tensor
    mask: torch.Tensor | None
    labels: torch.Tensor

    def __post_init__(self):
        self.errors = (self.logits.argmax(-1) != self.labels).float()  # once, not per training batch

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, idx):
        return (self.feats[idx], self.logits[idx], None if self.mask is None else self.mask[idx], self.errors[idx])


def _selection_key(auroc: float, bce: float) -> tuple[float, float]:
    """Higher is better: validation ROC-AUC, ties (or a one-class validation split) by lower BCE."""
    return (auroc if not math.isnan(auroc) else -math.inf, -bce)


def _auroc(u: np.ndarray, errors: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if errors.min() == errors.max():
        return float("nan")
    return float(roc_auc_score(errors, u))


@torch.no_grad()
def _score(head: AdUEHead, data: Cached) -> tuple[float, float]:
    """(validation error ROC-AUC, validation BCE) of a head."""
    u = head(data.feats, data.logits, data.mask)
    bce = float(F.binary_cross_entropy(u, data.errors))
    return _auroc(u.numpy(), data.errors.numpy()), bce


def train_head(init: AdUEHead, train: Cached, val: Cached, lr: float, alpha_reg: float, alpha_l2sp: float,
               epochs: int = 50, patience: int = 5, batch_size: int = 128, balanced: bool = True,
               seed: int = 0) -> tuple[AdUEHead, dict]:
    """One configuration: Adam + one-cycle cosine, class-balanced batches, early stopping on val ROC-AUC
    (val BCE when the validation split has only one class). Returns the best epoch's head and its record."""
    head = copy.deepcopy(init)
    head.theta0 = {n: t.clone() for n, t in init.theta0.items()}
    errors = train.errors
    gen = torch.Generator().manual_seed(int(seed))
    n = len(train)
    steps = max(1, math.ceil(n / batch_size))
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    # at least 20 scheduled steps: OneCycleLR divides by zero when its warm-up phase (10%) is under 2 steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(epochs * steps, 20), anneal_strategy="cos",
                                                pct_start=0.1, div_factor=25.0, final_div_factor=1e4)
    counts = torch.bincount(errors.long(), minlength=2).double()
    weights = (1.0 / counts.clamp(min=1))[errors.long()]
    best, best_key, best_epoch, bad = copy.deepcopy(head.state_dict()), None, -1, 0
    for epoch in range(epochs):
        if balanced:
            order = torch.multinomial(weights, n, replacement=True, generator=gen)
        else:
            order = torch.randperm(n, generator=gen)
        for i in range(steps):
            f, z, m, e = train.rows(order[i * batch_size:(i + 1) * batch_size])
            loss, _ = adue_loss(head, f, z, m, e, alpha_reg, alpha_l2sp)
            if not torch.isfinite(loss):
                raise UqloraError(f"AdUE head loss is {loss.item()} (lr={lr}, alpha_reg={alpha_reg}, "
                                  f"alpha_l2sp={alpha_l2sp}); lower method.grid.lr")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        auroc, bce = _score(head, val)
        key = _selection_key(auroc, bce)
        if best_key is None or key > best_key:
            best, best_key, best_epoch, bad = copy.deepcopy(head.state_dict()), key, epoch, 0
        else:
            bad += 1
            if bad >= patience:
                break
    head.load_state_dict(best)
    auroc, bce = _score(head, val)
    return head, {"lr": lr, "alpha_reg": alpha_reg, "alpha_l2sp": alpha_l2sp, "val_auroc": auroc, "val_bce": bce,
                  "best_epoch": best_epoch + 1, "epochs_run": epoch + 1}


def grid_search(init: AdUEHead, train: Cached, val: Cached, lrs, alpha_regs, alpha_l2sps, progress: bool | str = True,
                **kw) -> tuple[AdUEHead, list[dict], dict]:
    """Every (lr, alpha_reg, alpha_l2sp); the head with the best validation ROC-AUC (ties: lower val BCE),
    every configuration's record, and the chosen one's."""
    from uqlora.progress import track

    grid = list(itertools.product([float(x) for x in lrs], [float(x) for x in alpha_regs],
                                  [float(x) for x in alpha_l2sps]))
    if not grid:
        raise UqloraError("the AdUE grid is empty: give at least one value for method.grid.lr, alpha_reg, alpha_l2sp")
    best, best_rec, best_key, records = None, None, None, []
    for lr, a_reg, a_l2 in track(grid, "AdUE: head grid", progress):
        head, rec = train_head(init, train, val, lr, a_reg, a_l2, **kw)
        records.append(rec)
        key = _selection_key(rec["val_auroc"], rec["val_bce"])
        if best_key is None or key > best_key:
            best, best_rec, best_key = head, rec, key
    return best, records, best_rec


class Mahalanobis:
    """Class-conditional Gaussians with one shared covariance (``classes=None``: one Gaussian)."""

    def __init__(self, means: torch.Tensor, precision: torch.Tensor):
        self.means, self.precision = means.double(), precision.double()

    @classmethod
    def fit(cls, feats: torch.Tensor, labels: torch.Tensor | None) -> "Mahalanobis":
        x = feats.double()
        y = torch.zeros(x.shape[0], dtype=torch.long) if labels is None else labels.long()
        classes = torch.unique(y)
        means = torch.stack([x[y == c].mean(0) for c in classes])
        centred = x - means[torch.searchsorted(classes, y)]
        cov = centred.T @ centred / x.shape[0]
        return cls(means, torch.linalg.pinv(cov, hermitian=True))

    def score(self, feats: torch.Tensor) -> torch.Tensor:
        d = feats.double().unsqueeze(1) - self.means.unsqueeze(0)  # [N, K, d]
        return torch.einsum("nki,ij,nkj->nk", d, self.precision, d).min(1).values

    def state_dict(self) -> dict:
        return {"means": self.means, "precision": self.precision}
