"""The ``lm_sft`` head: token-level supervised fine-tuning of a causal LM (generation tasks).

``logits(batch) -> [R, V]``: the LM head's next-token logits over the whole vocabulary at the R target rows
of the batch (:mod:`uqlora.data.sft`: the row for target token ``t`` of example ``b`` is the hidden state at
position ``t - 1``), in the row-major order of ``target_mask.nonzero()``, i.e. the order of
``batch["labels"]``. The LM head is applied to those rows only, never to every position (V = 49152 for
SmolLM2: a [B, L, V] tensor would be most of the memory of a step). The LM head is frozen (tied to the input
embeddings in most small models); LoRA trains. ``features(batch) -> [R, d]`` are the LM head's inputs at the
same rows (the feature-space analysis of UAL's paper). Logits are float32 also under bf16 autocast.
"""
from __future__ import annotations

import torch
from torch import nn

from uqlora.models.backbone import Backbone


class LMSFTBackbone(Backbone):
    head_kind = "lm_sft"

    def __init__(self, transformer: nn.Module, lm_head: nn.Linear):
        super().__init__(transformer, int(lm_head.weight.shape[0]))
        self.lm_head = lm_head
        for p in self.lm_head.parameters():
            p.requires_grad_(False)

    @staticmethod
    def target_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(example index, position of the hidden state) of every target row."""
        rows, cols = batch["target_mask"].bool().nonzero(as_tuple=True)
        return rows, cols - 1

    def features(self, batch: dict) -> torch.Tensor:
        h = self.hidden(batch["input_ids"], batch["attention_mask"])
        rows, pos = self.target_rows(batch)
        return h[rows, pos]

    def logits_with_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(batch)
        return self.lm_head(f.to(self.lm_head.weight.dtype)).float(), f

    def logits(self, batch: dict) -> torch.Tensor:
        return self.logits_with_features(batch)[0]


def build_sft_backbone(mcfg, model) -> LMSFTBackbone:
    """LoRA (``model.lora``) on the decoder of a loaded causal LM, and its frozen LM head over the vocabulary."""
    from uqlora.models.backbone import _lora

    model.train()  # dropout (LoRA and base) active in fit; transformers 5 returns models in eval mode
    lm_head = model.get_output_embeddings()
    transformer = _lora(model.get_decoder() if hasattr(model, "get_decoder") else model.model, mcfg.lora)
    if mcfg.get("gradient_checkpointing", False):
        transformer.enable_input_require_grads()
    return LMSFTBackbone(transformer, lm_head)
