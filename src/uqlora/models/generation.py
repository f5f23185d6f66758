"""Free-text generation from a causal backbone (LoRA applied), for the probabilistic evaluation.

:func:`sample_continuations` decodes one continuation per prompt with a KV cache, token by token:
``logits = lm_head(h_t)`` (for the ``lm_choices`` head the trained answer rows replace those tokens'
rows, so the fine-tuned answer scores are what is sampled), the temperature (optionally adaptive per
token, see :func:`uqlora.metrics.probabilistic.adaptive_temperature`), nucleus (top-p) filtering, then a
draw from a seeded ``torch.Generator``; ``temperature=0`` is greedy decoding. Generation stops at EOS or
a newline (the answer is the first line; ``stop_at_newline=False``: at EOS only, for the multi-line answers of
token-level SFT). Prompts are left-padded, with position ids from the attention
mask, so a batch decodes like each prompt alone.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from uqlora.errors import UqloraError


def _head_logits(backbone, h: torch.Tensor) -> torch.Tensor:
    lm_head = getattr(backbone, "lm_head", None) or getattr(backbone, "generation_lm_head", None)
    if lm_head is None:
        raise UqloraError("free-text generation needs a causal LM backbone (head lm_choices or lm_cloze)")
    if lm_head.weight.device != h.device:  # the generation head of lm_choices is not a submodule: not moved
        lm_head.to(h.device)
    logits = lm_head(h.to(lm_head.weight.dtype)).float()
    rows = getattr(backbone, "answer_rows", None)
    if rows is not None and getattr(backbone, "answer_token_ids", None) is not None:
        ans = h.float() @ rows.float().T
        if getattr(backbone, "answer_bias", None) is not None:
            ans = ans + backbone.answer_bias.float()
        logits[:, backbone.answer_token_ids] = ans
    return logits


def next_token_probs(logits: torch.Tensor, temperature: float, top_p: float,
                     adaptive_threshold: float | None = None, adaptive_low: float = 0.0) -> torch.Tensor:
    """The distribution a token is drawn from: temperature (per row; 0 = greedy one-hot), then top-p."""
    p1 = logits.float().softmax(-1)
    t = torch.full((logits.shape[0], 1), float(temperature), device=logits.device)
    if adaptive_threshold is not None:
        t = torch.where(p1.max(-1, keepdim=True).values >= float(adaptive_threshold),
                        torch.full_like(t, float(adaptive_low)), t)
    greedy = F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    p = (logits.float() / t.clamp(min=1e-6)).softmax(-1)
    if top_p < 1.0:
        sp, idx = p.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < float(top_p)  # the smallest prefix whose mass reaches top_p
        sp = sp * keep
        p = torch.zeros_like(p).scatter_(-1, idx, sp)
        p = p / p.sum(-1, keepdim=True)
    return torch.where(t > 0, p, greedy)


@torch.no_grad()
def sample_continuations(backbone, tokenizer, prompts: list[str], max_new_tokens: int = 16,
                         temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                         max_length: int = 256, adaptive_threshold: float | None = None, adaptive_low: float = 0.0,
                         device: torch.device | None = None, autocast=None, stop_at_newline: bool = True,
                         add_special_tokens: bool = True) -> list[str]:
    """One continuation (its first line, or with ``stop_at_newline=False`` all of it; stripped) per prompt.
    ``add_special_tokens``: whether the tokenizer adds its special tokens (e.g. BOS) to the prompts."""
    device = device or next(backbone.parameters()).device
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:  # the tokenizer is shared with the collator, whose heads expect its own (right) padding
        enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=int(max_length),
                        add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    eos = tokenizer.eos_token_id
    B = ids.shape[0]
    out = torch.zeros((B, 0), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ctx = autocast or contextlib.nullcontext()
    with ctx:
        res = backbone.transformer(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past, h = res.past_key_values, res.last_hidden_state[:, -1]
    last_pos = pos[:, -1]
    for _ in range(int(max_new_tokens)):
        with ctx:
            logits = _head_logits(backbone, h)
        p = next_token_probs(logits, temperature, top_p, adaptive_threshold, adaptive_low)
        tok = torch.multinomial(p.cpu(), 1, generator=generator).squeeze(1).to(device)
        tok = torch.where(done, torch.full_like(tok, eos if eos is not None else 0), tok)
        out = torch.cat([out, tok[:, None]], dim=1)
        if eos is not None:
            done |= tok == eos
        if stop_at_newline:
            done |= torch.tensor(["\n" in tokenizer.decode([int(t)]) for t in tok], device=device)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        last_pos = last_pos + 1
        with ctx:
            res = backbone.transformer(input_ids=tok[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                                       past_key_values=past, use_cache=True)
        past, h = res.past_key_values, res.last_hidden_state[:, -1]
    texts = []
    for row in out.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        text = tokenizer.decode(row, skip_special_tokens=True)
        texts.append((text.split("\n")[0] if stop_at_newline else text).strip())
    return texts
