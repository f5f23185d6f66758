"""Backbone = pretrained transformer + LoRA adapters (peft) + one of five heads.

Every backbone (base class :class:`uqlora.models.base.Backbone`) exposes ``logits(batch) -> [B, C]`` and
``features(batch) -> [B, d]``:

* ``classifier``  -- a linear head on the [CLS] token (``pooling=cls``), the mean of the tokens
  (``mean``), the last non-pad token (``last``, decoders, as AdUE does) or the encoder's pooler output
  (``pooler``, BERT-style encoders: what ``BertForSequenceClassification``'s classifier reads);
* ``mc_classifier`` -- encoders on multiple choice (as BERT's multiple-choice head): each (question,
  choice) pair is encoded and pooled, one linear unit scores it, the C scores are the logits;
* ``lm_choices``  -- a causal LM's next-token logits at the answer position restricted to the answer
  tokens (" A", " B", ... or label words such as " negative"/" positive"); the C answer rows of the
  LM head are copied into a parameter that trains when ``lora.train_head`` is true;
* ``lm_cloze``    -- each choice's continuation scored by its log-likelihood after the context
  (:mod:`uqlora.models.cloze`: the context computed once per question, ``model.cloze_impl=packed``).
* ``lm_sft``      -- token-level SFT on generation data (:mod:`uqlora.models.sft`; built there, not here).

The decoder heads run the LM head only where it is read: ``lm_choices`` multiplies the last hidden state by
its C answer rows, ``classifier`` on a decoder has no LM head, ``lm_cloze`` applies it at the scored positions.

Padded (non-existent) choices are masked with ``choice_mask`` to a logit of -1e9, so their
probability is exactly zero. Logits are float32 also under bf16 autocast (float64 in a float64 model).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from uqlora.errors import ModelError
from uqlora.models.base import MASKED_LOGIT, Backbone, _last_index  # noqa: F401  (re-exported)
from uqlora.models.cloze import LMClozeBackbone

log = logging.getLogger(__name__)
HEADS = ("classifier", "mc_classifier", "lm_choices", "lm_cloze", "lm_sft")  # lm_sft: built by uqlora.models.sft


class ClassifierBackbone(Backbone):
    head_kind = "classifier"

    def __init__(self, transformer, num_classes, pooling="cls", head_dropout=0.1):
        super().__init__(transformer, num_classes)
        if pooling not in ("cls", "mean", "last", "pooler"):
            raise ModelError(f"unknown model.pooling '{pooling}'; valid choices: cls, mean, last, pooler")
        if pooling == "pooler" and getattr(transformer.get_base_model(), "pooler", None) is None:
            raise ModelError("model.pooling=pooler needs an encoder with a pooler layer (BERT-style); valid "
                             "choices: cls, mean, last")
        self.pooling = pooling
        self.dropout = nn.Dropout(head_dropout)
        self.head_input = nn.Identity()  # marks the head's input for curvature/Jacobian hooks
        self.head = nn.Linear(self.hidden_size, num_classes)

    def features(self, batch):
        if self.pooling == "pooler":
            return self.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        h, m = self.hidden(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "last":
            return h[torch.arange(h.shape[0], device=h.device), _last_index(m)]
        w = m.unsqueeze(-1).to(h.dtype)
        return (h * w).sum(1) / w.sum(1).clamp(min=1.0)

    def logits(self, batch):
        return self.logits_with_features(batch)[0]

    def logits_with_features(self, batch):
        f = self.features(batch)
        return self._mask(self.head(self.head_input(self.dropout(f))), batch), f

    def head_parameters(self):
        return (self.head.weight, self.head.bias) if self.head.weight.requires_grad else None


class MCClassifierBackbone(ClassifierBackbone):
    """Multiple choice for encoders: the batch holds the C (question, choice) pairs of every question as
    ``[B*C, L]``; pooled features ``[B*C, d]`` -> ``Linear(d, 1)`` -> scores ``[B, C]``. The linear unit is
    shared by the choices, so it is not a C-way head: :meth:`head_parameters` is None, and the Laplace
    posterior covers the LoRA layers only (the unit stays at its MAP value: with one output shared by the
    choices, a KFAC-reduce output factor would sum Fisher vectors that sum to zero over the classes)."""

    head_kind = "mc_classifier"

    def __init__(self, transformer, num_classes, pooling="cls", head_dropout=0.1):
        super().__init__(transformer, num_classes, pooling, head_dropout)
        self.head = nn.Linear(self.hidden_size, 1)

    def logits_with_features(self, batch):
        f = self.features(batch)  # [B*C, d]
        B = batch["labels"].shape[0]
        scores = self.head(self.head_input(self.dropout(f))).view(B, -1)
        return self._mask(scores, batch), f.view(B, -1, f.shape[-1])

    def head_parameters(self):
        return None


class LMChoicesBackbone(Backbone):
    head_kind = "lm_choices"

    def __init__(self, transformer, lm_head: nn.Linear, answer_token_ids: list[int], train_head: bool = True):
        super().__init__(transformer, len(answer_token_ids))
        ids = torch.tensor(answer_token_ids, dtype=torch.long)
        self.register_buffer("answer_token_ids", ids, persistent=False)
        self.answer_rows = nn.Parameter(lm_head.weight.detach()[ids].clone().float(), requires_grad=train_head)
        bias = getattr(lm_head, "bias", None)
        self.answer_bias = None if bias is None else nn.Parameter(bias.detach()[ids].clone().float(),
                                                                  requires_grad=train_head)
        self.head_input = nn.Identity()

    def head_parameters(self):
        return (self.answer_rows, self.answer_bias) if self.answer_rows.requires_grad else None

    def features(self, batch):
        h = self.hidden(batch["input_ids"], batch["attention_mask"])
        return h[torch.arange(h.shape[0], device=h.device), _last_index(batch["attention_mask"])]

    def logits(self, batch):
        return self.logits_with_features(batch)[0]

    def logits_with_features(self, batch):
        f = self.head_input(self.features(batch))
        out = f @ self.answer_rows.to(f.dtype).T
        if self.answer_bias is not None:
            out = out + self.answer_bias.to(f.dtype)
        return self._mask(out, batch), f


def _lora(transformer: nn.Module, lcfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    r = int(lcfg.r)
    if r <= 0:
        raise ModelError(f"model.lora.r must be a positive integer, got {r}")
    targets = list(lcfg.target_modules)
    names = {n.split(".")[-1] for n, _ in transformer.named_modules()}
    unknown = [t for t in targets if t not in names]
    if unknown:
        linear = sorted({n.split(".")[-1] for n, m in transformer.named_modules() if isinstance(m, nn.Linear)})
        raise ModelError(f"model.lora.target_modules {unknown} not found in the model; valid choices: {', '.join(linear)}")
    config = LoraConfig(r=r, lora_alpha=float(lcfg.alpha), lora_dropout=float(lcfg.dropout),
                        target_modules=targets, bias="none")
    return get_peft_model(transformer, config)


def resolve_head(mcfg, task: str) -> str:
    head = mcfg.get("head", "auto")
    if task == "generation":  # token-level SFT: the only head for generation data (uqlora.models.sft)
        if head not in ("auto", "lm_sft") or mcfg.kind != "causal":
            raise ModelError(f"generation data needs a causal LM with model.head=lm_sft (or auto); got model "
                             f"'{mcfg.name}' ({mcfg.kind}) with head={head}")
        return "lm_sft"
    if head == "lm_sft":
        raise ModelError(f"model.head=lm_sft trains on generation data (gsm8k, instruct, ...); this data is {task}")
    if head == "auto":
        if mcfg.kind == "encoder":
            head = "classifier" if task == "classification" else "mc_classifier"
        else:
            head = "lm_choices" if task == "classification" else "lm_cloze"
    if head not in HEADS:
        raise ModelError(f"unknown model.head '{head}'; valid choices: auto, {', '.join(HEADS)}")
    if head.startswith("lm_") and mcfg.kind != "causal":
        raise ModelError(f"model.head={head} needs a causal LM, but model '{mcfg.name}' is an {mcfg.kind}; use classifier")
    if head == "classifier" and task == "multiple_choice":
        raise ModelError("model.head=classifier does not score multiple-choice data; valid choices: mc_classifier "
                         "(encoders), lm_cloze / lm_choices (causal models)")
    if head == "mc_classifier" and task != "multiple_choice":
        raise ModelError("model.head=mc_classifier scores multiple-choice data only; valid choices for "
                         f"{task}: classifier (encoders), lm_choices (causal models)")
    return head


def answer_token_ids(tokenizer, words: list[str]) -> list[int]:
    """One token id per answer word (its first token); distinct ids are required."""
    ids = []
    for w in words:
        toks = tokenizer.encode(w, add_special_tokens=False)
        if not toks:
            raise ModelError(f"answer word {w!r} tokenises to nothing")
        if len(toks) > 1:
            log.warning("answer word %r is %d tokens; scoring its first token %r", w, len(toks),
                        tokenizer.decode(toks[:1]))
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ModelError(f"answer words {words} share a first token; choose distinct label words")
    return ids


def build_backbone(mcfg, head: str, num_classes: int, answer_words: list[str] | None = None, tokenizer=None,
                   model=None) -> Backbone:
    """Attach LoRA and the head to a loaded model (see :func:`uqlora.models.loading.load_pretrained`)."""
    model.train()  # transformers 5 returns models in eval mode; dropout (LoRA and base) must be active in fit
    lm_head = None
    if mcfg.kind == "causal":
        lm_head = model.get_output_embeddings()
        transformer = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    else:
        transformer = model
    transformer = _lora(transformer, mcfg.lora)
    if mcfg.get("gradient_checkpointing", False):
        transformer.enable_input_require_grads()
    if head in ("classifier", "mc_classifier"):
        cls = ClassifierBackbone if head == "classifier" else MCClassifierBackbone
        bb = cls(transformer, num_classes, pooling=mcfg.get("pooling", "cls"),
                                head_dropout=float(mcfg.get("head_dropout", 0.1)))
        bb.head.requires_grad_(bool(mcfg.lora.get("train_head", True)))
        return bb
    if head == "lm_choices":
        ids = answer_token_ids(tokenizer, list(answer_words))
        bb = LMChoicesBackbone(transformer, lm_head, ids, train_head=bool(mcfg.lora.get("train_head", True)))
        object.__setattr__(bb, "generation_lm_head", lm_head)  # full vocabulary for free-text generation (not a
        return bb                                              # submodule: its weight is not trained or saved)
    return LMClozeBackbone(transformer, lm_head, num_classes, norm=mcfg.get("cloze_norm", "char"),
                           impl=mcfg.get("cloze_impl", "packed"), scale=mcfg.get("cloze_scale", "fixed"),
                           scale_lr=float(mcfg.get("cloze_scale_lr", 0.05)))
