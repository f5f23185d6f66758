"""Backbone = pretrained transformer + LoRA adapters (peft) + one of three heads.

Every backbone exposes ``logits(batch) -> [B, C]`` and ``features(batch) -> [B, d]``:

* ``classifier``  -- a linear head on the [CLS] token (``pooling=cls``), the mean of the tokens
  (``mean``), the last non-pad token (``last``, decoders, as AdUE does) or the encoder's pooler output
  (``pooler``, BERT-style encoders: what ``BertForSequenceClassification``'s classifier reads);
* ``mc_classifier`` -- encoders on multiple choice (as BERT's multiple-choice head): each (question,
  choice) pair is encoded and pooled, one linear unit scores it, the C scores are the logits;
* ``lm_choices``  -- a causal LM's next-token logits at the answer position restricted to the answer
  tokens (" A", " B", ... or label words such as " negative"/" positive"); the C answer rows of the
  LM head are copied into a parameter that trains when ``lora.train_head`` is true;
* ``lm_cloze``    -- each choice's continuation scored by its log-likelihood after the context,
  normalised by its length in tokens (``cloze_norm=token``), characters (``char``) or not at all
  (``none``); the C scores are the logits.

Padded (non-existent) choices are masked with ``choice_mask`` to a logit of -1e9, so their
probability is exactly zero. Logits are float32 also under bf16 autocast.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from uqlora.errors import ModelError, UqloraError

log = logging.getLogger(__name__)
MASKED_LOGIT = -1e9
HEADS = ("classifier", "mc_classifier", "lm_choices", "lm_cloze", "lm_sft")  # lm_sft: built by uqlora.models.sft


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
        logits = logits.float()
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

    @property
    def choice_head(self) -> nn.Linear:
        return self.head

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


class LMClozeBackbone(Backbone):
    head_kind = "lm_cloze"

    def __init__(self, transformer, lm_head: nn.Linear, num_classes: int, norm: str = "char"):
        super().__init__(transformer, num_classes)
        if norm not in ("token", "char", "none"):
            raise ModelError(f"unknown model.cloze_norm '{norm}'; valid choices: token, char, none")
        self.norm = norm
        self.lm_head = lm_head
        for p in self.lm_head.parameters():
            p.requires_grad_(False)

    def _hidden_flat(self, batch):
        return self.hidden(batch["input_ids"], batch["attention_mask"])  # [B*C, L, d]

    def _choice_last(self, h, batch):
        last = h[torch.arange(h.shape[0], device=h.device), _last_index(batch["attention_mask"])]
        return last.view(batch["labels"].shape[0], -1, last.shape[-1])  # [B, C, d]

    def features(self, batch):
        last = self._choice_last(self._hidden_flat(batch), batch)
        w = batch["choice_mask"].unsqueeze(-1).to(last.dtype)
        return (last * w).sum(1) / w.sum(1).clamp(min=1.0)

    def logits(self, batch):
        return self._scores(self._hidden_flat(batch), batch)

    def logits_with_features(self, batch):
        h = self._hidden_flat(batch)
        return self._scores(h, batch), self._choice_last(h, batch)

    def _scores(self, h, batch):
        ids = batch["input_ids"]
        tgt = batch["target_mask"].bool().clone()
        tgt[:, 0] = False  # the first token has no prediction
        rows, cols = tgt.nonzero(as_tuple=True)
        logp = F.log_softmax(self.lm_head(h[rows, cols - 1]).float(), dim=-1)
        tok_lp = logp.gather(1, ids[rows, cols].unsqueeze(1)).squeeze(1)
        scores = torch.zeros(ids.shape[0], device=ids.device, dtype=torch.float32).index_add_(0, rows, tok_lp)
        if self.norm == "token":
            scores = scores / tgt.sum(1).clamp(min=1)
        elif self.norm == "char":
            scores = scores / batch["cont_chars"].float().clamp(min=1)
        B = batch["labels"].shape[0]
        return self._mask(scores.view(B, -1), batch)


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
    return LMClozeBackbone(transformer, lm_head, num_classes, norm=mcfg.get("cloze_norm", "char"))
