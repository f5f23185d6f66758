"""Impossible values, caught in one line before any data or model is loaded.

Misspelled keys and choices outside an enumeration fail when Hydra composes the config (typed method schemas,
:mod:`uqlora.schema`). This module applies the value rules: those of the shared config groups (:data:`RULES`:
``model.lora.r=0``, ``optim.lr=-1``, ``eval.prob.alpha=1.5``, ...), the rules the selected method's schema
declares on its fields (``method.max_rank=1``, ``method.num_samples=0``, ...), and the few rules that relate
several keys. Each names its key and the valid values; a key the config does not have is skipped.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from uqlora.errors import UqloraError
from uqlora.schema import (HALF_OPEN_UNIT, NON_NEGATIVE, OPEN_UNIT, POSITIVE, SAMPLES, TOP_P, UNIT, Check, int_at_least,
                           one_of, optional, schema_rules)

_MISSING = object()


# key -> (test, valid values); applies whenever the composed config has the key
RULES: dict[str, Check] = {
    "seed": int_at_least(0),
    "model.lora.r": int_at_least(1),
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": HALF_OPEN_UNIT,
    "model.head_dropout": HALF_OPEN_UNIT,
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_ratio": UNIT,
    "optim.eps": POSITIVE,
    "loss.label_smoothing": HALF_OPEN_UNIT,
    "data.batch_size": int_at_least(1),
    "data.eval_batch_size": int_at_least(1),
    "data.max_length": optional(int_at_least(1)),
    "data.max_train_samples": optional(int_at_least(1)),
    "data.max_val_samples": optional(int_at_least(1)),
    "data.max_calib_samples": optional(int_at_least(1)),
    "data.max_test_samples": optional(int_at_least(1)),
    "data.max_ood_samples": optional(int_at_least(1)),
    "data.val_size": optional(SAMPLES),
    "data.calib_size": optional(SAMPLES),
    "trainer.accumulate_grad_batches": int_at_least(1),
    "trainer.gradient_clip_val": optional(NON_NEGATIVE),
    "train.checkpoint_every_n_steps": optional(int_at_least(1)),
    "train.early_stopping_patience": optional(int_at_least(1)),
    "train.reuse_map": ((lambda v: isinstance(v, bool)), "true or false"),
    "eval.n_bins": int_at_least(1),
    "eval.prob.n_samples": int_at_least(1),
    "eval.prob.alpha": OPEN_UNIT,
    "eval.prob.temperature": NON_NEGATIVE,
    "eval.prob.adaptive_threshold": optional(UNIT),
    "eval.prob.adaptive_low": NON_NEGATIVE,
    "eval.prob.gen_n_samples": int_at_least(1),
    "eval.prob.gen_max_queries": optional(int_at_least(1)),
    "eval.prob.gen_max_new_tokens": int_at_least(1),
    "eval.prob.gen_temperature": NON_NEGATIVE,
    "eval.prob.gen_top_p": TOP_P,
    "model.head": one_of("auto", "classifier", "mc_classifier", "lm_choices", "lm_cloze", "lm_sft"),
    "model.pooling": one_of("cls", "mean", "last", "pooler"),
    "model.cloze_norm": one_of("token", "char", "none"),
    "model.cloze_impl": one_of("packed", "separate"),
    "model.cloze_scale": one_of("fixed", "learned"),
    "model.cloze_scale_lr": POSITIVE,
    "model.kind": one_of("encoder", "causal"),
    "model.source": one_of("hub", "package", "random"),
    "data.val_source": one_of("official", "carve"),
    "optim.schedule": one_of("linear", "constant"),
    "eval.prob.gen_score": one_of("rouge_l", "rouge_l_recall", "exact_match"),
    "loss.token_reduction": one_of("sample", "token"),
    "eval.sft.max_queries": optional(int_at_least(1)),
    "eval.sft.max_new_tokens": int_at_least(1),
    "eval.sft.silhouette_tokens": int_at_least(1),
    "eval.sft.silhouette_max_points": int_at_least(2),
    "logger.kind": one_of("wandb", "csv", "none"),
    "progress_bar": one_of("auto", "rich", "text", "none"),
    "model.precision": one_of("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"),
}
SPLITS = ("train", "val", "calib", "test")


def _get(cfg: DictConfig, key: str):
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return _MISSING
        node = node[part]
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`UqloraError` naming the first impossible value and its valid range."""
    rules = dict(RULES)
    name = _get(cfg, "method.name")
    if name is not _MISSING:
        from uqlora.methods import SCHEMAS, get_method

        get_method(str(name))  # an unknown method fails here, naming the valid ones
        rules.update(schema_rules(SCHEMAS[str(name)]))
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
    if _get(cfg, "eval.probabilistic") is True and _get(cfg, "eval.prob.generate") is True \
            and _get(cfg, "model.kind") != "causal":
        raise UqloraError(f"eval.prob.generate=true needs a causal LM; model '{_get(cfg, 'model.name')}' is an "
                          f"{_get(cfg, 'model.kind')}")
    sources = [k for k in ("method.map_run", "method.adapter", "train.init_adapter") if _get(cfg, k) not in (_MISSING, None)]
    if len(sources) > 1:
        raise UqloraError(f"{' and '.join(sources)} are set together; valid: one starting adapter (map_run: a run "
                          "directory, adapter: a PEFT adapter used as is, init_adapter: one to train further)")
    splits = _get(cfg, "eval.splits")
    if splits is not _MISSING:
        bad = [s for s in (splits or []) if s not in SPLITS]
        if bad or not splits:
            raise UqloraError(f"eval.splits={splits!r} is impossible; valid: a non-empty list of {', '.join(SPLITS)}")
