"""Our adapter in PEFT format, for plain ``peft`` / ``transformers`` (the reverse of :mod:`uqlora.models.peft_io`).

:func:`export_adapter` names every LoRA matrix as ``peft`` does for the model class a user loads --
``AutoModelForCausalLM`` (causal LMs), ``AutoModel`` (encoders), or ``AutoModelForSequenceClassification``
when our classifier head is exactly that class's (BERT-style ``classifier`` on the pooler with
``model.pooling=pooler``; a decoder's bias-free ``score`` on the last token): then the head is its
``modules_to_save`` and ``PeftModel.from_pretrained(base, folder)`` computes our logits. Any other trained
head goes to :data:`~uqlora.models.peft_io.HEAD_FILE` in the same folder (safetensors: ``head.weight``
``[C, d]`` and ``head.bias`` ``[C]`` on the pooled features; for ``lm_choices`` ``answer_rows`` ``[C, d]``,
``answer_bias`` ``[C]`` and ``answer_token_ids`` ``[C]``: the logits are the last non-pad token's hidden
state times ``answer_rows``), and :data:`~uqlora.models.peft_io.META_FILE` says what the folder holds
(the model config name, base model, class to load, head kind, pooling, number of classes, answer token ids).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from uqlora.models.peft_io import ADAPTER_CONFIG, HEAD_FILE, META_FILE, WEIGHTS, our_lora

@dataclass
class ExportedAdapter:
    """Our adapter in PEFT format: ``adapter_config.json``, ``adapter_model.safetensors`` (plain-peft names for
    ``meta["load_with"]``), and the head file when the head is no transformers module."""

    config: dict
    tensors: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    meta: dict

    def files(self) -> dict[str, bytes | None]:
        """File name -> content (None: a stale file of that name is removed)."""
        from safetensors.torch import save

        as_bytes = lambda d: save({k: v.detach().cpu().contiguous() for k, v in d.items()})  # noqa: E731
        return {ADAPTER_CONFIG: json.dumps(self.config, indent=2, sort_keys=True).encode(),
                WEIGHTS[0]: as_bytes(self.tensors), WEIGHTS[1]: None,
                HEAD_FILE: as_bytes(self.head) if self.head else None,
                META_FILE: json.dumps(self.meta, indent=2).encode()}


def _seq_cls_head(backbone, mcfg) -> tuple[str, str] | None:
    """``(base-model attribute, head module)`` of the ``AutoModelForSequenceClassification`` whose head is exactly
    our classifier (BERT-style ``classifier`` on the pooler; decoders' bias-free ``score`` on the last token),
    checked on a meta-device instance of that class; None when there is no such class."""
    from torch import nn

    if backbone.head_kind != "classifier":
        return None
    base, bias = backbone.transformer.get_base_model(), backbone.head.bias
    if mcfg.kind == "causal":
        if backbone.pooling != "last" or (bias is not None and bool(bias.detach().abs().max() > 0)):
            return None
        name = "score"
    elif backbone.pooling == "pooler":
        name = "classifier"
    else:
        return None
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(base.config)
    config.num_labels = backbone.num_classes
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except (ValueError, KeyError, TypeError):  # no sequence-classification class for this architecture
        return None
    head, inner = getattr(model, name, None), getattr(model, base.base_model_prefix, None)
    if (not isinstance(head, nn.Linear) or type(inner) is not type(base)
            or tuple(head.weight.shape) != tuple(backbone.head.weight.shape) or (head.bias is None) != (name == "score")):
        return None
    return base.base_model_prefix, name


def export_adapter(backbone, mcfg) -> ExportedAdapter:
    """Our backbone's LoRA (+ head) for plain ``peft``: ``PeftModel.from_pretrained(base, folder)`` with
    ``base`` an instance of ``meta["load_with"]`` built from the base model."""
    from peft import LoraConfig

    base = backbone.transformer.get_base_model()
    params = dict(backbone.named_parameters())
    kind, seq = backbone.head_kind, _seq_cls_head(backbone, mcfg)
    if seq is not None:
        prefix, task_type, load_with = seq[0] + ".", "SEQ_CLS", "AutoModelForSequenceClassification"
    elif mcfg.kind == "causal":
        prefix, task_type, load_with = base.base_model_prefix + ".", "CAUSAL_LM", "AutoModelForCausalLM"
    else:
        prefix, task_type, load_with = "", "FEATURE_EXTRACTION", "AutoModel"
    tensors = {f"base_model.model.{prefix}{mod}.lora_{ab}.weight": params[name].detach().float().clone()
               for (mod, ab), name in sorted(our_lora(backbone).items())}
    head: dict[str, torch.Tensor] = {}
    if seq is not None:
        tensors[f"base_model.model.{seq[1]}.weight"] = backbone.head.weight.detach().float().clone()
        if seq[1] == "classifier":
            tensors[f"base_model.model.{seq[1]}.bias"] = backbone.head.bias.detach().float().clone()
    elif kind in ("classifier", "mc_classifier"):
        head = {"head.weight": backbone.head.weight.detach().float().clone(),
                "head.bias": backbone.head.bias.detach().float().clone()}
    elif kind == "lm_choices":
        head = {"answer_rows": backbone.answer_rows.detach().float().clone(),
                "answer_token_ids": backbone.answer_token_ids.detach().cpu().clone()}
        if backbone.answer_bias is not None:
            head["answer_bias"] = backbone.answer_bias.detach().float().clone()
    elif kind == "lm_cloze" and backbone.log_scale is not None:
        head = {"cloze_log_scale": backbone.log_scale.detach().float().clone()}
    alpha = float(mcfg.lora.alpha)
    config = LoraConfig(r=int(mcfg.lora.r), lora_alpha=int(alpha) if alpha.is_integer() else alpha,
                        lora_dropout=float(mcfg.lora.dropout), target_modules=sorted(mcfg.lora.target_modules),
                        bias="none", task_type=task_type, modules_to_save=[seq[1]] if seq else None,
                        base_model_name_or_path=mcfg.get("hub_id") or mcfg.name, revision=mcfg.get("revision"),
                        inference_mode=True).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else (str(v.value) if hasattr(v, "value") else v)
              for k, v in config.items()}
    meta = {"format": "uqlora-adapter/1", "model": mcfg.name, "base_model": config["base_model_name_or_path"],
            "load_with": load_with, "head": kind, "num_classes": backbone.num_classes,
            "pooling": getattr(backbone, "pooling", None), "cloze_norm": getattr(backbone, "norm", None),
            "cloze_scale": ("learned" if getattr(backbone, "log_scale", None) is not None else "fixed")
            if kind == "lm_cloze" else None,
            "answer_token_ids": backbone.answer_token_ids.tolist() if kind == "lm_choices" else None,
            "head_file": HEAD_FILE if head else None}
    return ExportedAdapter(config, tensors, head, meta)
