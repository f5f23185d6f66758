"""Records -> model inputs: prompt templates and the collator for each head.

Templates are ``str.format`` strings from the data config (``data.prompt``):

* ``template``     -- classification prompts for causal LMs, with ``{text}`` and ``{text_pair}``
  (encoders get the raw text / text pair instead);
* ``mc_template``  -- multiple choice with letters (``lm_choices``): ``{question}`` and ``{options}``
  ("A. ...\\nB. ..."); the answer words are " A", " B", ...;
* ``cloze_template`` -- the context of the cloze head (``lm_cloze``) with ``{question}``; each choice's
  continuation is " " + the choice text, unless a record brings its own ``cloze`` pairs
  (WinoGrande partial scoring); its two batch layouts are in :mod:`uqlora.data.cloze_batch`.

A collator called on ``(index, record)`` pairs (what :class:`~uqlora.data.datamodule.UQDataModule`'s loaders
give it) adds each example's position in its split as ``index [B]``.

Causal prompts are truncated from the left so the answer position is never cut.
"""
from __future__ import annotations

import string

import torch

from uqlora.data.cloze_batch import CLOZE_IMPLS, cloze_pairs, packed_batch, separate_batch
from uqlora.errors import DataError

LETTERS = string.ascii_uppercase
DEFAULT_TEMPLATE = "{text}\nAnswer:"
DEFAULT_MC_TEMPLATE = "Question: {question}\n{options}\nAnswer:"
DEFAULT_CLOZE_TEMPLATE = "Question: {question}\nAnswer:"


def answer_words(prompt_cfg, task: str, num_classes: int, label_names) -> list[str]:
    """The C answer words scored by ``lm_choices``."""
    if task == "multiple_choice":
        return [f" {LETTERS[i]}" for i in range(num_classes)]
    words = (prompt_cfg or {}).get("label_words")
    if words:
        if len(words) != num_classes:
            raise ValueError(f"data.prompt.label_words has {len(words)} words for {num_classes} classes")
        return list(words)
    if not label_names:  # e.g. a custom dataset with integer labels: the words are only needed by lm_choices
        return [f" {i}" for i in range(num_classes)]
    return [f" {n}" for n in label_names]


def format_classification(rec: dict, template: str) -> str:
    return template.format(text=rec["text"], text_pair=rec.get("text_pair") or "")


def format_mc(rec: dict, template: str) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(rec["choices"]))
    return template.format(question=rec["question"], options=options)


PER_EXAMPLE_FLOATS = ("uncertainty", "label_smoothing", "entropy_subset")


class Collator:
    """Tokenises a list of records into the batch dict of one head (see ``models.backbone``)."""

    def __init__(self, tokenizer, head: str, task: str, num_classes: int, max_length: int, prompt_cfg=None,
                 causal: bool = True, cloze_impl: str = "packed"):
        self.tok, self.head, self.task, self.C, self.max_length = tokenizer, head, task, num_classes, max_length
        self.causal = causal
        if cloze_impl not in CLOZE_IMPLS:
            raise DataError(f"unknown model.cloze_impl '{cloze_impl}'; valid choices: {', '.join(CLOZE_IMPLS)}")
        self.cloze_impl = cloze_impl
        p = dict(prompt_cfg or {})
        self.template = p.get("template") or DEFAULT_TEMPLATE
        self.mc_template = p.get("mc_template") or DEFAULT_MC_TEMPLATE
        self.cloze_template = p.get("cloze_template") or DEFAULT_CLOZE_TEMPLATE

    def _labels(self, records) -> torch.Tensor:
        return torch.tensor([int(r["label"]) for r in records], dtype=torch.long)

    def _choice_mask(self, records) -> torch.Tensor:
        n = torch.tensor([len(r["choices"]) for r in records])
        return torch.arange(self.C).unsqueeze(0) < n.unsqueeze(1)

    def _encode(self, texts, pairs=None) -> dict:
        self.tok.truncation_side = "left" if self.causal else "right"
        self.tok.padding_side = "right"  # the heads find the last token of a row as its number of real tokens
        enc = self.tok(texts, pairs, truncation=True, max_length=self.max_length, padding=True,
                       return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def length(self, record: dict) -> int:
        """The padded length of ``record``'s batch on its own (the sequence length its rows need)."""
        return int(self([record])["input_ids"].shape[-1])

    def __call__(self, records: list) -> dict:
        index = None
        if records and isinstance(records[0], tuple):  # (position in the split, record) from the loaders
            index = torch.tensor([i for i, _ in records], dtype=torch.long)
            records = [r for _, r in records]
        if self.head == "lm_cloze":
            make = packed_batch if self.cloze_impl == "packed" else separate_batch
            batch = make(self.tok, records, self.cloze_template, self.C, self.max_length)
            pairs = [{"choices": cloze_pairs(r, self.cloze_template)} for r in records]
            batch["choice_mask"] = self._choice_mask(pairs)
        elif self.head == "mc_classifier":  # encoders: every (question, choice) pair, padded to C pairs
            qs, cs = [], []
            for r in records:
                if len(r["choices"]) > self.C:
                    raise ValueError(f"record {r.get('id')} has {len(r['choices'])} choices, more than num_classes={self.C}")
                qs += [r["question"]] * self.C
                cs += list(r["choices"]) + [""] * (self.C - len(r["choices"]))
            batch = self._encode(qs, cs)
            batch["choice_mask"] = self._choice_mask(records)
        elif self.task == "multiple_choice":
            batch = self._encode([format_mc(r, self.mc_template) for r in records])
            batch["choice_mask"] = self._choice_mask(records)
        elif self.causal:
            batch = self._encode([format_classification(r, self.template) for r in records])
        else:
            pairs = [r.get("text_pair") for r in records]
            batch = self._encode([r["text"] for r in records], pairs if any(p for p in pairs) else None)
        batch["labels"] = self._labels(records)
        for key in PER_EXAMPLE_FLOATS:  # e.g. UAL's per-example label smoothing, when every record has it
            if all(key in r for r in records):
                batch[key] = torch.tensor([float(r[key]) for r in records], dtype=torch.float32)
        if index is not None:
            batch["index"] = index
        return batch
