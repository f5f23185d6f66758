"""Per-example uncertainty scores of a categorical predictive, in torch (differentiable where the training loss
needs them); :mod:`uqlora.metrics.selective` has the numpy versions used for evaluation. Masked (padded)
choices have probability 0 and count neither as a class nor in the entropy."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def valid_count(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The number of real choices per example (at least 2)."""
    C = probs.shape[-1]
    n = torch.full(probs.shape[:-1], float(C), dtype=probs.dtype, device=probs.device) if mask is None \
        else mask.to(probs.dtype).sum(-1)
    return n.clamp(min=2.0)


def entropy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` per example; masked choices (-1e9 logits) contribute 0."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def normalized_entropy(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Predictive entropy divided by log C (C = number of valid choices), in [0, 1]."""
    ent = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
    return ent / valid_count(probs, mask).log()


def sr_uncertainty(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax response as an uncertainty in [0, 1]: ``(1 - max p) / (1 - 1/C)``."""
    return (1 - probs.max(-1).values) / (1 - 1 / valid_count(probs, mask))
