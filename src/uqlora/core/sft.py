"""Token-level supervised fine-tuning: how target rows are averaged, and what a prediction keeps of them.

A token-level SFT batch has R target rows (:mod:`uqlora.data.sft`): row r is target token ``labels[r]`` of
example ``row_sample[r]``. The loss of every row is the (smoothed) cross-entropy over the vocabulary
(:func:`uqlora.methods.base.smoothed_cross_entropy`); :func:`row_weights` sets how the rows are averaged:

* ``sample`` -- each example's mean over its target tokens, then the mean over the examples: every example
  weighs the same, however long its answer. What the UAL authors' training does: their loss divides the sum
  over a micro-batch's tokens by its number of tokens, with micro-batches of one example, and the 64
  micro-batches of an optimiser step are averaged (gradient accumulation).
* ``token`` -- the mean over all target tokens of the batch (Hugging Face's ``ignore_index`` cross-entropy
  with a batch of several examples): long answers weigh more.

A prediction of a generation split cannot keep ``[N, V]`` probabilities. :func:`token_scores` reduces the
predictive ``[R, V]`` of a batch to per-example sums (``n_tokens``, ``nll_sum``, ``correct_sum``,
``brier_sum``, ``nentropy_sum``: NLL, next-token accuracy, Brier score and entropy / log V of the target
tokens) and per-token arrays (``tok_conf``: the top next-token probability, ``tok_correct``: whether that token
is the reference token), from which the token NLL, accuracy and ECE of a split follow.
"""
from __future__ import annotations

import math

import torch

from uqlora.errors import UqloraError

REDUCTIONS = ("sample", "token")
NLL_FLOOR = 1e-12  # as uqlora.metrics.calibration.nll: a zero probability costs -log(1e-12) = 27.6 nats


def row_weights(row_sample: torch.Tensor, n_examples: int, reduction: str = "sample") -> torch.Tensor:
    """Weights ``[R]`` summing to 1 over the rows (see the module docstring)."""
    if reduction not in REDUCTIONS:
        raise UqloraError(f"unknown loss.token_reduction '{reduction}'; valid choices: {', '.join(REDUCTIONS)}")
    R = row_sample.shape[0]
    if reduction == "token":
        return torch.full((R,), 1.0 / max(R, 1), device=row_sample.device)
    counts = torch.bincount(row_sample, minlength=int(n_examples)).float()
    present = int((counts > 0).sum())
    return 1.0 / (counts[row_sample] * max(present, 1))


def token_scores(probs: torch.Tensor, labels: torch.Tensor, row_sample: torch.Tensor, n_examples: int) -> dict:
    """Per-example sums and per-token arrays of a batch's predictive ``probs [R, V]`` (module docstring)."""
    p = probs.float()
    V = p.shape[1]
    p_y = p.gather(1, labels.unsqueeze(1)).squeeze(1)
    conf, pred = p.max(-1)
    correct = pred == labels
    per_row = {"nll_sum": -p_y.clamp(min=NLL_FLOOR).log(), "correct_sum": correct.float(),
               "brier_sum": (p * p).sum(-1) - 2 * p_y + 1,
               "nentropy_sum": torch.special.entr(p).sum(-1) / math.log(V)}
    out = {"n_tokens": torch.bincount(row_sample, minlength=int(n_examples))}
    for key, x in per_row.items():
        out[key] = torch.zeros(int(n_examples), dtype=torch.float32, device=p.device).index_add_(0, row_sample, x)
    out.update({"tok_conf": conf, "tok_correct": correct})
    return out
