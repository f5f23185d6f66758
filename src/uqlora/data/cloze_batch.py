"""Batches of the cloze head (``lm_cloze``) in its two layouts (``model.cloze_impl``).

Choice ``c`` of a question is the token sequence ``s_c = context_c + continuation_c`` (the context with
special tokens, truncated from the left so that ``len(s_c) <= max_length``); its score sums
``log p(s_c[j] | s_c[:j])`` over the continuation's positions ``j``.

* ``separate`` -- one row per choice, ``input_ids [B*C, L]``: every question's context is computed C times
  (questions with fewer than C choices get placeholder rows, masked out by ``choice_mask``).
* ``packed``   -- one row per question, ``input_ids [B, T]``: the longest common token prefix ``P`` of the
  question's sequences (its context, usually) once, then the remainder ``s_c[len(P):]`` of each choice.
  ``position_ids`` restart at ``len(P)`` for every remainder and ``segment_ids`` (0: the shared prefix,
  ``c + 1``: choice c's remainder, -1: padding) define the attention: a token sees the earlier tokens of the
  prefix and of its own segment only, so every position computes exactly what it computes in ``s_c`` alone
  (the same log-likelihoods, and the same gradients: the prefix's gradient is the sum of the C sequences').
  ``attention_mask [B, T]`` marks the real tokens. The scored positions: ``cont_pos [B, C, K]`` (the packed
  position whose next-token distribution scores the token), ``cont_ids [B, C, K]`` (the token),
  ``cont_mask [B, C, K]``; ``last_pos [B, C]``: the packed position of the last token of ``s_c``.
  Missing choices have no tokens at all.

Both layouts carry ``cont_chars`` (characters of each continuation) and ``choice_mask [B, C]``.
"""
from __future__ import annotations

import torch

CLOZE_IMPLS = ("packed", "separate")
PLACEHOLDER = ("", " ")  # the separate layout's row for a missing choice


def cloze_pairs(rec: dict, template: str) -> list[tuple[str, str]]:
    """The (context, continuation) texts of a record's choices: its own ``cloze`` pairs (WinoGrande partial
    scoring), else the template's context and ``" " + choice``."""
    if rec.get("cloze"):
        return [(c, t) for c, t in rec["cloze"]]
    ctx = template.format(question=rec["question"])
    return [(ctx, " " + c) for c in rec["choices"]]


def choice_sequence(tok, ctx: str, cont: str, max_length: int) -> tuple[list[int], int]:
    """``(s_c, start)``: the token ids of context + continuation and the index where the continuation starts.
    An empty context becomes the BOS (or pad) token, so every continuation token has a predecessor."""
    c_ids = tok(cont, add_special_tokens=False)["input_ids"][: max_length - 1]
    x_ids = tok(ctx, add_special_tokens=True)["input_ids"] if ctx else []
    if not x_ids:
        x_ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id]
    x_ids = x_ids[-(max_length - len(c_ids)):]
    return x_ids + c_ids, len(x_ids)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def pack_question(seqs: list[list[int]], starts: list[int]) -> dict:
    """One question's packed row: ``ids``, ``pos``, ``seg`` (lists of length T) and per choice the scored
    ``(predictor position, token)`` pairs and the position of its last token."""
    P = _common_prefix(seqs)
    ids, pos, seg = list(seqs[0][:P]), list(range(P)), [0] * P
    scored, last = [], []
    for c, s in enumerate(seqs):
        off = len(ids)
        ids += s[P:]
        pos += range(P, len(s))
        seg += [c + 1] * (len(s) - P)
        where = lambda j, off=off: j if j < P else off + j - P  # noqa: E731  position j of s_c in the row
        scored.append([(where(j - 1), s[j]) for j in range(max(starts[c], 1), len(s))])
        last.append(where(len(s) - 1))
    return {"ids": ids, "pos": pos, "seg": seg, "scored": scored, "last": last}


def packed_batch(tok, records: list[dict], template: str, C: int, max_length: int) -> dict:
    rows, chars = [], torch.zeros(len(records), C, dtype=torch.long)
    for b, r in enumerate(records):
        pairs = cloze_pairs(r, template)
        if len(pairs) > C:
            raise ValueError(f"record {r.get('id')} has {len(pairs)} choices, more than num_classes={C}")
        seqs = [choice_sequence(tok, x, c, max_length) for x, c in pairs]
        rows.append(pack_question([s for s, _ in seqs], [k for _, k in seqs]))
        chars[b, : len(pairs)] = torch.tensor([len(c) for _, c in pairs])
    B, T = len(rows), max(len(r["ids"]) for r in rows)
    K = max(len(sc) for r in rows for sc in r["scored"])
    out = {"input_ids": torch.full((B, T), tok.pad_token_id, dtype=torch.long),
           "attention_mask": torch.zeros(B, T, dtype=torch.long),
           "position_ids": torch.zeros(B, T, dtype=torch.long),
           "segment_ids": torch.full((B, T), -1, dtype=torch.long),
           "cont_pos": torch.zeros(B, C, K, dtype=torch.long), "cont_ids": torch.zeros(B, C, K, dtype=torch.long),
           "cont_mask": torch.zeros(B, C, K, dtype=torch.bool), "last_pos": torch.zeros(B, C, dtype=torch.long),
           "cont_chars": chars}
    for b, r in enumerate(rows):
        n = len(r["ids"])
        out["input_ids"][b, :n] = torch.tensor(r["ids"])
        out["attention_mask"][b, :n] = 1
        out["position_ids"][b, :n] = torch.tensor(r["pos"])
        out["segment_ids"][b, :n] = torch.tensor(r["seg"])
        for c, sc in enumerate(r["scored"]):
            if sc:
                out["cont_pos"][b, c, : len(sc)] = torch.tensor([p for p, _ in sc])
                out["cont_ids"][b, c, : len(sc)] = torch.tensor([t for _, t in sc])
                out["cont_mask"][b, c, : len(sc)] = True
        out["last_pos"][b, : len(r["last"])] = torch.tensor(r["last"])
    return out


def separate_batch(tok, records: list[dict], template: str, C: int, max_length: int) -> dict:
    seqs, targets, chars = [], [], []
    for r in records:
        pairs = cloze_pairs(r, template)
        if len(pairs) > C:
            raise ValueError(f"record {r.get('id')} has {len(pairs)} choices, more than num_classes={C}")
        for ctx, cont in pairs + [PLACEHOLDER] * (C - len(pairs)):
            s, start = choice_sequence(tok, ctx, cont, max_length)
            seqs.append(s)
            targets.append([0] * start + [1] * (len(s) - start))
            chars.append(len(cont))
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    tgt = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, targets)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        tgt[i, : len(t)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": att, "target_mask": tgt,
            "cont_chars": torch.tensor(chars, dtype=torch.long)}
