"""The base class of every backbone: the LoRA-wrapped transformer, masking of missing choices, and the adapter
(+ head) state that is saved. The heads are in :mod:`uqlora.models.backbone` and :mod:`uqlora.models.cloze`."""
from __future__ import annotations

import torch
from torch import nn

from uqlora.errors import UqloraError

MASKED_LOGIT = -1e9


def param_groups(backbone: nn.Module) -> list[dict]:
    """AdamW parameter groups of a backbone's trainable parameters: the adapter (+ head) at the optimiser's rate,
    and the backbone's own-rate parameters (``own_lr_parameters``, e.g. the learned cloze scale) at their rate
    without weight decay. A plain ``nn.Module`` (test doubles) has no own-rate parameters."""
    own, own_lr = getattr(backbone, "own_lr_parameters", lambda: ([], 0.0))()
    ids = {id(p) for p in own}
    groups = [{"params": [p for p in backbone.parameters() if p.requires_grad and id(p) not in ids]}]
    if own:
        groups.append({"params": own, "lr": float(own_lr), "weight_decay": 0.0})
    return groups


def _last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row (right padding)."""
    return attention_mask.long().sum(1).clamp(min=1) - 1


class Backbone(nn.Module):
    """Base class: owns the LoRA-wrapped transformer and the bookkeeping shared by the heads."""

    head_kind: str = ""

    def __init__(self, transformer: nn.Module, num_classes: int):
        super().__init__()
        self.transformer = transformer
        self.num_classes = int(num_classes)

    @property
    def hidden_size(self) -> int:
        return int(self.transformer.config.hidden_size)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _mask(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 under autocast; fp64 stays
        mask = batch.get("choice_mask")
        return logits if mask is None else logits.masked_fill(~mask.bool(), MASKED_LOGIT)

    def logits(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def features(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def logits_with_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C], features)`` from one forward pass: the head's input ``[B, d]`` (before head
        dropout), or for the cloze head the last hidden state of each choice's sequence ``[B, C, d]``."""
        raise NotImplementedError

    def forward(self, batch: dict) -> torch.Tensor:
        return self.logits(batch)

    def own_lr_parameters(self) -> tuple[list[nn.Parameter], float]:
        """Trainable parameters that AdamW steps at their own learning rate, without weight decay (on the shared
        schedule), and that rate: e.g. the learned cloze scale, which the adapter's small rate would barely move."""
        return [], 0.0

    def head_parameters(self) -> tuple[nn.Parameter, nn.Parameter | None] | None:
        """(weight [C, d], bias [C] or None) of the trained linear head whose input is ``head_input``'s
        output, or None when there is no trained head (Laplace treats it as one more KFAC layer)."""
        return None

    # --- adapter + head state: the only thing that is saved -------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [n for n in own if n in state and tuple(state[n].shape) != tuple(own[n].shape)]
        if missing or unexpected or bad:
            first = (missing or unexpected or bad)[0]
            raise UqloraError(
                f"checkpoint does not match this model ({len(missing)} missing, {len(unexpected)} unexpected, "
                f"{len(bad)} wrong-shape tensors, e.g. '{first}'): it was saved from a different model/head/LoRA config")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n].to(device=p.device, dtype=p.dtype))
