"""Records -> batches for token-level supervised fine-tuning of a causal LM (head ``lm_sft``).

A generation record ``{prompt, input, response, ...}`` becomes one conversation:

* **Format.** With a tokenizer that has a chat template (SmolLM2-Instruct, Qwen, Llama-3, ...): the user turn
  is the instruction (``prompt``, followed by ``"\\n\\n" + input`` when the record has an input) and the
  assistant turn is the ``response``; the template's own system prompt, if it inserts one, is kept. The
  *prompt* is the rendered conversation up to the assistant's turn (``add_generation_prompt=True``), the
  *response* is what the full conversation adds after it, up to and including the end-of-turn token (trailing
  whitespace dropped), so the model learns to stop. Without a chat template: the plain format of the UAL
  authors' scripts, ``"\\n### User: {instruction}\\n\\n### Assistant: "`` + response + EOS, with the
  tokenizer's special tokens (e.g. BOS) on the prompt.
* **Targets.** ``data.mask_prompt=true`` (default, modern SFT): only the response tokens are predicted;
  ``false`` (the authors' scripts, ``mask_inputs=False``): every token after the first.
* **Truncation** to ``max_length`` never cuts the start of the response: when prompt + response are too long,
  the response keeps its first ``max(max_length - len(prompt), max_length // 2)`` tokens (cut at its end)
  and the prompt keeps the tokens next to the response (cut from the left).

A batch holds ``input_ids`` / ``attention_mask`` ``[B, L]`` (right padding), ``target_mask`` ``[B, L]`` (1 where
the token is a target, predicted from the position before it; position 0 never is), ``labels`` ``[R]`` -- the
target tokens in row-major order, the order of ``target_mask.nonzero()`` -- and ``row_sample`` ``[R]``, the
example each target row belongs to. Per-example floats (UAL's ``label_smoothing``, ...) are repeated for each
of their example's rows, so the loss sees one value per row.
"""
from __future__ import annotations

import torch

from uqlora.data.prompts import PER_EXAMPLE_FLOATS
from uqlora.errors import DataError

PLAIN_PROMPT = "\n### User: {instruction}\n\n### Assistant: "


def user_turn(rec: dict) -> str:
    """The instruction, followed by the record's input (when it has one) after a blank line."""
    text = str(rec["prompt"])
    extra = rec.get("input")
    return f"{text}\n\n{extra}" if extra else text


def fit_lengths(n_prompt: int, n_response: int, max_length: int) -> tuple[int, int]:
    """(prompt tokens kept, response tokens kept) within ``max_length`` (see the module docstring)."""
    if n_prompt + n_response <= max_length:
        return n_prompt, n_response
    keep_r = min(n_response, max(max_length - n_prompt, max_length // 2))
    return max_length - keep_r, keep_r


class SFTCollator:
    """Tokenises generation records into the batch of the ``lm_sft`` head (see the module docstring)."""

    def __init__(self, tokenizer, max_length: int, mask_prompt: bool = True):
        if int(max_length) < 2:
            raise DataError(f"data.max_length={max_length} is too short for SFT: a response token needs a prompt token "
                            "before it (valid: an integer >= 2)")
        self.tok, self.max_length, self.mask_prompt = tokenizer, int(max_length), bool(mask_prompt)
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.prompt_special_tokens = not self.chat  # the plain format lets the tokenizer add BOS to the prompt
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # --- text --------------------------------------------------------------------------------------------
    def texts(self, rec: dict) -> tuple[str, str]:
        """(prompt text, response text) of a record; the response includes the end-of-turn marker."""
        if not self.chat:
            return PLAIN_PROMPT.format(instruction=user_turn(rec)), str(rec["response"])
        user = [{"role": "user", "content": user_turn(rec)}]
        prompt = self.tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = self.tok.apply_chat_template(user + [{"role": "assistant", "content": str(rec["response"])}],
                                            tokenize=False)
        if not full.startswith(prompt):
            raise DataError(f"the tokenizer's chat template renders record {rec.get('id')} differently with and without "
                            "the assistant turn, so prompt and response cannot be split; use a model whose template "
                            "extends its generation prompt")
        return prompt, full[len(prompt):].rstrip()

    def prompt_text(self, rec: dict) -> str:
        """What generation is conditioned on (tokenise it with ``add_special_tokens=prompt_special_tokens``)."""
        return self.texts(rec)[0]

    def encode(self, rec: dict) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of a record, before truncation."""
        prompt, response = self.texts(rec)
        p = self.tok(prompt, add_special_tokens=self.prompt_special_tokens)["input_ids"]
        r = self.tok(response, add_special_tokens=False)["input_ids"]
        if not self.chat and self.tok.eos_token_id is not None:
            r = r + [self.tok.eos_token_id]
        if not p or not r:
            raise DataError(f"record {rec.get('id')} tokenises to an empty prompt or response")
        return p, r

    # --- batch -------------------------------------------------------------------------------------------
    def __call__(self, records: list[dict]) -> dict:
        seqs, starts = [], []
        for rec in records:
            p, r = self.encode(rec)
            kp, kr = fit_lengths(len(p), len(r), self.max_length)
            seqs.append(p[len(p) - kp:] + r[:kr])
            starts.append(kp if self.mask_prompt else 1)  # first target position
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(seqs), L), dtype=torch.long)
        tgt = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, (s, start) in enumerate(zip(seqs, starts)):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
            tgt[i, start: len(s)] = 1
        rows = tgt.bool().nonzero(as_tuple=True)
        batch = {"input_ids": ids, "attention_mask": att, "target_mask": tgt, "labels": ids[rows],
                 "row_sample": rows[0]}
        for key in PER_EXAMPLE_FLOATS:  # per example -> per target row
            if all(key in r for r in records):
                batch[key] = torch.tensor([float(r[key]) for r in records], dtype=torch.float32)[rows[0]]
        return batch
