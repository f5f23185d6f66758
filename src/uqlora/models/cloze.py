"""The cloze head (``lm_cloze``): each choice's continuation scored by its log-likelihood after the context,
normalised by its length in tokens (``cloze_norm=token``), characters (``char``) or not at all (``none``);
the C scores are the logits -- or, with ``model.cloze_scale=learned``, the scores times ``exp(s)`` with ``s`` a
trainable scalar (0 at the start): length-normalised log-likelihoods of different answers are close to each
other, so the C-way softmax over them is nearly flat and a fixed scale leaves the model underconfident.

Two computations of the same scores (``model.cloze_impl``, batch layouts in :mod:`uqlora.data.cloze_batch`):

* ``packed`` (default) -- one sequence per question: the shared prefix (the context) once, then each
  choice's continuation, under a block attention mask built here from ``segment_ids`` (a token sees the
  earlier tokens of the prefix and of its own continuation) with ``position_ids`` restarting after the
  prefix. One forward pass over ``[B, T]`` tokens instead of ``[B*C, L]``: the context is computed once per
  question, not once per choice. Every LoRA layer sees one input row per token of the question; the
  log-likelihoods, gradients and Jacobians equal the separate path's (the prefix's gradient is the sum of the
  C sequences'), while per-position curvature approximations (KFAC) see the context once instead of C times.
  Needs an attention implementation that takes a 4D mask: ``sdpa`` (the default) or ``eager``.
* ``separate`` -- one sequence per choice (``[B*C, L]``); the context is recomputed for every choice.

The LM head is applied at the scored positions only. Features (:meth:`LMClozeBackbone.logits_with_features`)
are the last hidden state of each choice's sequence, ``[B, C, d]`` (zero for missing choices in the packed
layout).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from uqlora.data.cloze_batch import CLOZE_IMPLS
from uqlora.errors import ModelError, UqloraError
from uqlora.models.base import Backbone, _last_index

NORMS = ("token", "char", "none")
SCALES = ("fixed", "learned")
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}  # attention implementations that take a 4D mask


def block_attention_mask(segment_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` boolean: query t attends key s <= t when both are real tokens and s is in the shared
    prefix (segment 0) or in t's own segment; a pad position attends to itself only (no empty softmax row)."""
    T = segment_ids.shape[1]
    real = attention_mask.bool()
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    seg_q, seg_k = segment_ids.unsqueeze(2), segment_ids.unsqueeze(1)
    allowed = causal & ((seg_k == 0) | (seg_k == seg_q)) & real.unsqueeze(1) & real.unsqueeze(2)
    allowed |= torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    return allowed.unsqueeze(1)


class LMClozeBackbone(Backbone):
    head_kind = "lm_cloze"

    def __init__(self, transformer, lm_head: nn.Linear, num_classes: int, norm: str = "char", impl: str = "packed",
                 scale: str = "fixed", scale_lr: float = 0.05):
        super().__init__(transformer, num_classes)
        if norm not in NORMS:
            raise ModelError(f"unknown model.cloze_norm '{norm}'; valid choices: {', '.join(NORMS)}")
        if scale not in SCALES:
            raise ModelError(f"unknown model.cloze_scale '{scale}'; valid choices: {', '.join(SCALES)}")
        # learned: logits = exp(log_scale) * score, a temperature of the choice scores trained with the adapter
        # (saved with it; the Laplace posterior keeps it at its trained value, SWAG samples it with the LoRA weights)
        self.log_scale = nn.Parameter(torch.zeros(())) if scale == "learned" else None
        self.scale_lr = float(scale_lr)  # AdamW moves log_scale by ~lr per step: its own rate, no weight decay
        if impl not in CLOZE_IMPLS:
            raise ModelError(f"unknown model.cloze_impl '{impl}'; valid choices: {', '.join(CLOZE_IMPLS)}")
        self.norm, self.impl = norm, impl
        if impl == "packed":
            self._mask_kind()
        self.lm_head = lm_head
        for p in self.lm_head.parameters():
            p.requires_grad_(False)

    def _mask_kind(self) -> str:
        attn = getattr(self.transformer.config, "_attn_implementation", None) or "eager"
        if attn not in MASK_KINDS:
            raise ModelError(f"model.cloze_impl=packed needs an attention implementation that takes a 4D mask "
                             f"({', '.join(MASK_KINDS)}), but the model uses '{attn}'; use model.cloze_impl=separate")
        return MASK_KINDS[attn]

    def _check_layout(self, batch) -> None:
        layout = "packed" if "segment_ids" in batch else "separate"
        if layout != self.impl:
            raise UqloraError(f"a '{layout}' cloze batch reached a model with model.cloze_impl={self.impl}: build the "
                              f"collator / datamodule with cloze_impl='{self.impl}'")

    def own_lr_parameters(self):
        return ([self.log_scale], self.scale_lr) if self.log_scale is not None else ([], 0.0)

    # --- hidden states ------------------------------------------------------------------------------------
    def _hidden(self, batch) -> torch.Tensor:
        """``[B, T, d]`` (packed) or ``[B*C, L, d]`` (separate)."""
        self._check_layout(batch)
        if self.impl == "separate":
            return self.hidden(batch["input_ids"], batch["attention_mask"])
        mask = block_attention_mask(batch["segment_ids"], batch["attention_mask"])
        if self._mask_kind() == "additive":
            dtype = self.transformer.get_input_embeddings().weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        out = self.transformer(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"])
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _choice_last(self, h, batch) -> torch.Tensor:
        """The last hidden state of each choice's sequence ``[B, C, d]``."""
        B = batch["labels"].shape[0]
        if self.impl == "separate":
            last = h[torch.arange(h.shape[0], device=h.device), _last_index(batch["attention_mask"])]
            return last.view(B, -1, last.shape[-1])
        last = h[torch.arange(B, device=h.device).unsqueeze(1), batch["last_pos"]]
        return last * batch["choice_mask"].unsqueeze(-1).to(last.dtype)

    def _token_logp(self, h, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(choice row b*C + c of each scored token, its log-probability, tokens per choice [B*C])``; the LM
        head runs on the scored positions only."""
        if self.impl == "separate":
            ids = batch["input_ids"]
            tgt = batch["target_mask"].bool().clone()
            tgt[:, 0] = False  # the first token has no prediction
            rows, cols = tgt.nonzero(as_tuple=True)
            hid, tok = h[rows, cols - 1], ids[rows, cols]
            counts = tgt.sum(1)
        else:
            m = batch["cont_mask"]
            b, c, k = m.nonzero(as_tuple=True)
            rows = b * m.shape[1] + c
            hid, tok = h[b, batch["cont_pos"][b, c, k]], batch["cont_ids"][b, c, k]
            counts = m.sum(-1).reshape(-1)
        out = self.lm_head(hid)
        logp = F.log_softmax(out.to(torch.promote_types(out.dtype, torch.float32)), dim=-1)
        return rows, logp.gather(1, tok.unsqueeze(1)).squeeze(1), counts

    def _scores(self, h, batch) -> torch.Tensor:
        rows, tok_lp, counts = self._token_logp(h, batch)
        B = batch["labels"].shape[0]
        scores = torch.zeros(counts.shape[0], device=tok_lp.device, dtype=tok_lp.dtype).index_add_(0, rows, tok_lp)
        if self.norm == "token":
            scores = scores / counts.clamp(min=1)
        elif self.norm == "char":
            scores = scores / batch["cont_chars"].reshape(-1).to(scores.dtype).clamp(min=1)
        if self.log_scale is not None:
            scores = scores * self.log_scale.exp().to(scores.dtype)
        return self._mask(scores.view(B, -1), batch)

    # --- the backbone interface -----------------------------------------------------------------------------
    def features(self, batch):
        last = self._choice_last(self._hidden(batch), batch)
        w = batch["choice_mask"].unsqueeze(-1).to(last.dtype)
        return (last * w).sum(1) / w.sum(1).clamp(min=1.0)

    def logits(self, batch):
        return self._scores(self._hidden(batch), batch)

    def logits_with_features(self, batch):
        h = self._hidden(batch)
        return self._scores(h, batch), self._choice_last(h, batch)
