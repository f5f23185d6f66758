"""Impossible values, caught in one line before any data or model is loaded.

The typed method schemas catch misspelled keys and wrong types at composition; this module catches values of
the right type that cannot work (``model.lora.r=0``, ``optim.lr=-1``, ``method.max_rank=1``,
``eval.prob.alpha=1.5``, ``method.num_samples=0``, ...). Each rule names its key and the valid range; a key
the config does not have is skipped (methods differ in their keys). The methods re-check their own values
when they are built, so a config assembled in Python is covered too.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from uqlora.errors import UqloraError

_MISSING = object()


def _int_at_least(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo), f"an integer >= {lo}"


def _number(test: Callable[[float], bool], text: str) -> tuple[Callable[[Any], bool], str]:
    def ok(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and test(float(v))

    return ok, text


POSITIVE = _number(lambda v: v > 0, "a finite number > 0")
NON_NEGATIVE = _number(lambda v: v >= 0, "a finite number >= 0")
OPEN_UNIT = _number(lambda v: 0 < v < 1, "a number in (0, 1)")
HALF_OPEN_UNIT = _number(lambda v: 0 <= v < 1, "a number in [0, 1)")
UNIT = _number(lambda v: 0 <= v <= 1, "a number in [0, 1]")
TOP_P = _number(lambda v: 0 < v <= 1, "a number in (0, 1]")
SAMPLES = _number(lambda v: v >= 0 if float(v).is_integer() else 0 < v < 1, "0, a fraction in (0, 1) or a count >= 1")


def _optional(rule):
    test, text = rule
    return (lambda v: v is None or test(v)), f"null or {text}"


# key -> (test, valid values); applies whenever the composed config has the key
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _int_at_least(0),
    "model.lora.r": _int_at_least(1),
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": HALF_OPEN_UNIT,
    "model.head_dropout": HALF_OPEN_UNIT,
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_ratio": UNIT,
    "optim.eps": POSITIVE,
    "loss.label_smoothing": HALF_OPEN_UNIT,
    "data.batch_size": _int_at_least(1),
    "data.eval_batch_size": _int_at_least(1),
    "data.max_length": _optional(_int_at_least(1)),
    "data.max_train_samples": _optional(_int_at_least(1)),
    "data.max_val_samples": _optional(_int_at_least(1)),
    "data.max_calib_samples": _optional(_int_at_least(1)),
    "data.max_test_samples": _optional(_int_at_least(1)),
    "data.max_ood_samples": _optional(_int_at_least(1)),
    "data.val_size": _optional(SAMPLES),
    "data.calib_size": _optional(SAMPLES),
    "trainer.accumulate_grad_batches": _int_at_least(1),
    "trainer.gradient_clip_val": _optional(NON_NEGATIVE),
    "train.checkpoint_every_n_steps": _optional(_int_at_least(1)),
    "train.early_stopping_patience": _optional(_int_at_least(1)),
    "eval.n_bins": _int_at_least(1),
    "eval.prob.n_samples": _int_at_least(1),
    "eval.prob.alpha": OPEN_UNIT,
    "eval.prob.temperature": NON_NEGATIVE,
    "eval.prob.adaptive_threshold": _optional(UNIT),
    "eval.prob.adaptive_low": NON_NEGATIVE,
    "eval.prob.gen_n_samples": _int_at_least(1),
    "eval.prob.gen_max_queries": _optional(_int_at_least(1)),
    "eval.prob.gen_max_new_tokens": _int_at_least(1),
    "eval.prob.gen_temperature": NON_NEGATIVE,
    "eval.prob.gen_top_p": TOP_P,
    "method.num_models": _int_at_least(1),
    "method.num_samples": _int_at_least(1),
    "method.collect_every": _int_at_least(1),
    "method.scale": NON_NEGATIVE,
    "method.n_kfac": _int_at_least(1),
    "method.lowrank_threshold": _int_at_least(1),
    "method.fisher_samples": _int_at_least(1),
    "method.prior.init": POSITIVE,
    "method.lam": POSITIVE,
    "method.epochs": _int_at_least(1),
    "method.patience": _int_at_least(1),
    "method.eps_mean": HALF_OPEN_UNIT,
}
# SWAG's low-rank part needs two deviation columns: K >= 2 (swag, multiswag)
METHOD_RULES = {"max_rank": _int_at_least(2), "lr": _optional(POSITIVE)}
SPLITS = ("train", "val", "calib", "test")


def _get(cfg: DictConfig, key: str):
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return _MISSING
        node = node[part]
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`UqloraError` naming the first impossible value and its valid range."""
    rules = dict(RULES)
    if str(_get(cfg, "method.name")) in ("swag", "multiswag"):
        rules.update({f"method.{k}": r for k, r in METHOD_RULES.items()})
    for key, (test, text) in rules.items():
        value = _get(cfg, key)
        if value is _MISSING:
            continue
        if not test(value):
            raise UqloraError(f"{key}={value!r} is impossible; valid: {text}")
    epochs, steps = _get(cfg, "trainer.max_epochs"), _get(cfg, "trainer.max_steps")
    if epochs is not _MISSING and steps is not _MISSING and epochs is not None:
        if not (isinstance(epochs, int) and (epochs >= 1 or epochs == -1)):
            raise UqloraError(f"trainer.max_epochs={epochs!r} is impossible; valid: an integer >= 1 (or -1 with max_steps)")
        if epochs == -1 and not (isinstance(steps, int) and steps >= 1):
            raise UqloraError(f"trainer.max_epochs=-1 needs trainer.max_steps >= 1, got {steps!r}")
    splits = _get(cfg, "eval.splits")
    if splits is not _MISSING:
        bad = [s for s in (splits or []) if s not in SPLITS]
        if bad or not splits:
            raise UqloraError(f"eval.splits={splits!r} is impossible; valid: a non-empty list of {', '.join(SPLITS)}")
