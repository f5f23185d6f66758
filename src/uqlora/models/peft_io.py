"""LoRA adapters in PEFT format, in and out of our backbone.

**Import** (:func:`read_adapter`, :func:`load_adapter`): a folder holding ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``.bin``) -- written by ``peft``'s ``save_pretrained``, ``trl``, ``axolotl``,
or by us -- or a hub id of one. The adapter's base model (``base_model_name_or_path``) and target modules are
checked against the model config; its ``r`` and ``lora_alpha`` must be ``model.lora.r`` / ``model.lora.alpha``.
Plain peft names a LoRA matrix after the model class it wrapped (``base_model.model.model.layers.0...`` for a
PeftModel over ``AutoModelForCausalLM``, ``base_model.model.bert.encoder...`` over
``BertForSequenceClassification``); ours wraps the decoder (causal LMs) or ``AutoModel`` (encoders), so the
leading module names that differ are found once (the prefix under which the adapter's modules are exactly
ours) and dropped.

Heads: ``lm_choices`` takes the pretrained LM-head rows of the answer tokens and ``lm_cloze`` the LM head
itself, so a causal LM's adapter needs nothing more. A ``classifier`` / ``mc_classifier`` head comes from

* the adapter's ``modules_to_save`` head when it is exactly one linear layer on features we compute:
  ``score`` (``LlamaForSequenceClassification`` & co: last-token pooling, no bias) needs
  ``model.pooling=last``; ``classifier`` of a BERT-style model (``BertForSequenceClassification``: the
  encoder's pooler output) needs ``model.pooling=pooler``;
* or :data:`HEAD_FILE` in the same folder (what our exports write when the head is no transformers module).

**Export** is :mod:`uqlora.models.peft_export`. Its head file :data:`HEAD_FILE` (safetensors: ``head.weight``
``[C, d]`` and ``head.bias`` ``[C]``, or for ``lm_choices`` ``answer_rows``, ``answer_bias``,
``answer_token_ids``) and metadata :data:`META_FILE` (JSON) are read back here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uqlora.errors import ModelError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
HEAD_FILE = "uqlora_head.safetensors"
META_FILE = "uqlora_adapter.json"
_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z_]\w*)?\.weight$")
_OURS = re.compile(r"^transformer\.base_model\.model\.(?P<mod>.+)\.lora_(?P<ab>[AB])\.default\.weight$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
UNSUPPORTED = {"use_dora": "DoRA", "use_rslora": "rsLoRA", "rank_pattern": "per-module ranks (rank_pattern)",
               "alpha_pattern": "per-module alphas (alpha_pattern)", "lora_bias": "LoRA biases",
               "layer_replication": "layer replication"}


@dataclass
class PeftAdapter:
    """An adapter as read from its folder: config, weights (plain-peft names), our head file and metadata."""

    source: str
    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    sha256: str = ""  # of the weights file

    @property
    def base(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")

    def lora(self) -> dict[tuple[str, str], torch.Tensor]:
        """``{(module path, "A"|"B"): tensor}`` of the LoRA matrices (``base_model.model.`` dropped)."""
        out = {}
        for k, v in self.tensors.items():
            m = _LORA.match(k)
            if m:
                out[(m["mod"], m["ab"])] = v
        return out

    def target_modules(self) -> list[str]:
        """The modules carrying LoRA, by their last name (what ``target_modules`` lists), from the weights."""
        return sorted({mod.rsplit(".", 1)[-1] for mod, _ in self.lora()})

    def saved_modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """``modules_to_save`` weights by module path: ``{"score": {"weight": ...}}``."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in self.tensors.items():
            if _LORA.match(k):
                continue
            k = re.sub(r"\.modules_to_save(\.[A-Za-z_]\w*)?(?=\.)", "", k.removeprefix("base_model.model."))
            mod, _, leaf = k.rpartition(".")
            out.setdefault(mod, {})[leaf] = v
        return out


# --- reading ----------------------------------------------------------------------------------------------
def resolve_folder(source: str, what: str = "method.adapter") -> Path:
    """A local folder, or the hub snapshot of a hub id (one line when the hub is offline or has no such id)."""
    path = Path(str(source)).expanduser()
    if path.exists():
        if not (path / ADAPTER_CONFIG).is_file():
            raise ModelError(f"{what}='{source}' is not a PEFT adapter folder (no {ADAPTER_CONFIG} in it)")
        return path
    if not _HUB_ID.match(str(source)):
        raise ModelError(f"{what}='{source}' does not exist; valid: a folder with {ADAPTER_CONFIG} + "
                         f"{WEIGHTS[0]}, or a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    from uqlora.models.loading import hub_offline

    try:
        folder = Path(snapshot_download(str(source), allow_patterns=[ADAPTER_CONFIG, *WEIGHTS, HEAD_FILE, META_FILE]))
    except Exception as e:  # offline without a cached copy, unknown id, no network, gated repo
        why = ("the hub is offline (HF_HUB_OFFLINE=1) with no cached copy" if hub_offline()
               else f"the hub did not give it ({type(e).__name__})")
        raise ModelError(f"{what}='{source}' is not a local folder, and {why}; pass a folder holding "
                         f"{ADAPTER_CONFIG}") from e
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{what}='{source}': the hub repository has no {ADAPTER_CONFIG} (not a PEFT adapter)")
    return folder


def read_adapter(source: str | Path, what: str = "method.adapter") -> PeftAdapter:
    """Config, weights and (when present) our head file and metadata of an adapter folder or hub id."""
    folder = resolve_folder(str(source), what)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except ValueError as e:
        raise ModelError(f"{what}='{source}': {ADAPTER_CONFIG} is not JSON ({e})") from e
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelError(f"{what}='{source}' is a {config.get('peft_type')} adapter; valid: LORA")
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise ModelError(f"{what}='{source}' has no adapter weights ({' or '.join(WEIGHTS)})")
    tensors = _load_tensors(weights)
    head = _load_tensors(folder / HEAD_FILE) if (folder / HEAD_FILE).is_file() else {}
    meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).is_file() else {}
    return PeftAdapter(str(source), folder, config, tensors, head, meta, hashlib.sha256(weights.read_bytes()).hexdigest())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# --- checking ---------------------------------------------------------------------------------------------
def same_base(base: str, mcfg) -> bool | None:
    """Whether the adapter's base model is this model config's (hub id, config name, or a local folder named
    after either); None when the adapter does not say."""
    if not base:
        return None
    names = {str(n).strip("/").lower() for n in (mcfg.get("hub_id"), mcfg.get("name")) if n}
    b = base.strip("/").lower()
    return b in names or b.rsplit("/", 1)[-1] in {n.rsplit("/", 1)[-1] for n in names}


def check_adapter(adapter: PeftAdapter, mcfg, what: str = "method.adapter") -> None:
    """Base model, target modules, rank and alpha of the adapter against ``model=...``: one line on a mismatch."""
    ours = sorted(str(t) for t in mcfg.lora.target_modules)
    same = same_base(adapter.base, mcfg)
    targets = adapter.target_modules()
    if same is False or targets != ours:
        raise ModelError(f"{what}='{adapter.source}' was trained on base model '{adapter.base or '?'}' with LoRA on "
                         f"{targets}; this run's model '{mcfg.name}' is '{mcfg.get('hub_id') or mcfg.name}' with "
                         f"model.lora.target_modules={ours}")
    if same is None:
        log.warning("%s '%s' names no base model (adapter_config.json base_model_name_or_path); assuming '%s'",
                    what, adapter.source, mcfg.name)
    c = adapter.config
    bad = [text for key, text in UNSUPPORTED.items() if c.get(key) not in (None, False, {}, "none")]
    if c.get("bias", "none") != "none":
        bad.append(f"bias={c.get('bias')}")
    if bad:
        raise ModelError(f"{what}='{adapter.source}' uses {', '.join(bad)}, which the backbone's plain LoRA "
                         "layers do not have; valid: plain LoRA (r, lora_alpha, target_modules)")
    r, alpha = int(c.get("r", 8)), float(c.get("lora_alpha", 8))
    if r != int(mcfg.lora.r) or alpha != float(mcfg.lora.alpha):
        raise ModelError(f"{what}='{adapter.source}' has r={r}, lora_alpha={alpha:g}; this run model.lora.r="
                         f"{mcfg.lora.r}, model.lora.alpha={mcfg.lora.alpha}: add model.lora.r={r} "
                         f"model.lora.alpha={alpha:g}")
    if float(c.get("lora_dropout", 0.0)) != float(mcfg.lora.dropout):
        log.info("%s: lora_dropout %s (adapter) vs model.lora.dropout %s (used when training)", what,
                 c.get("lora_dropout"), mcfg.lora.dropout)


# --- mapping onto our backbone ----------------------------------------------------------------------------
def our_lora(backbone) -> dict[tuple[str, str], str]:
    """``{(module path inside the wrapped transformer, "A"|"B"): our parameter name}``."""
    out = {}
    for name, _ in backbone.named_parameters():
        m = _OURS.match(name)
        if m:
            out[(m["mod"], m["ab"])] = name
    return out


def _prefix(theirs: set[str], ours: set[str]) -> str | None:
    """The leading module path whose removal makes the adapter's LoRA modules exactly ours (``""``, ``model.``)."""
    first = sorted(theirs)[0]
    parts = first.split(".")
    for k in range(len(parts)):
        p = ".".join(parts[:k]) + ("." if k else "")
        if {t[len(p):] if t.startswith(p) else None for t in theirs} == ours:
            return p
    return None


def adapter_state(adapter: PeftAdapter, backbone, mcfg, what: str = "method.adapter") -> dict[str, torch.Tensor]:
    """The backbone's trainable state with the adapter's LoRA matrices (and head, when it has one) in it."""
    state = backbone.trainable_state_dict()
    ours, theirs = our_lora(backbone), adapter.lora()
    stray = [k for k in adapter.tensors if "lora_" in k and not _LORA.match(k)]
    if stray:
        raise ModelError(f"{what}='{adapter.source}' holds LoRA tensors the backbone has no place for (e.g. "
                         f"'{stray[0]}': embedding LoRA, DoRA magnitudes or LoRA biases); valid: plain linear LoRA")
    p = _prefix({m for m, _ in theirs}, {m for m, _ in ours})
    if p is None:
        raise ModelError(f"{what}='{adapter.source}': its {len(theirs)} LoRA matrices (e.g. '{sorted(theirs)[0][0]}') "
                         f"do not map onto the {len(ours)} of model '{mcfg.name}' (e.g. '{sorted(ours)[0][0]}'): "
                         f"trained on another base model ('{adapter.base or '?'}')")
    for (mod, ab), tensor in theirs.items():
        name = ours[(mod[len(p):], ab)]
        if name not in state:
            raise ModelError(f"{what}: LoRA parameter '{name}' is frozen in this method; it cannot take the adapter")
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ModelError(f"{what}='{adapter.source}': '{mod}.lora_{ab}' has shape {tuple(tensor.shape)}, model "
                             f"'{mcfg.name}' expects {tuple(state[name].shape)}: trained on another base model "
                             f"('{adapter.base or '?'}')")
        state[name] = tensor
    state.update(_head_state(adapter, backbone, state, what))
    return state


def _head_state(adapter: PeftAdapter, backbone, state: dict, what: str) -> dict[str, torch.Tensor]:
    kind, saved = backbone.head_kind, adapter.saved_modules()
    hint = ("; for its classification head add model.head=classifier model.pooling=last"
            if {"score", "classifier"} & set(saved) else "")
    if kind == "lm_cloze":
        if saved:
            raise ModelError(f"{what}='{adapter.source}' also trains {sorted(saved)} (modules_to_save), which "
                             f"model.head=lm_cloze does not use (it scores with the pretrained LM head){hint}")
        return _cloze_scale(adapter, backbone, what)
    if kind == "lm_choices":
        return _answer_rows(adapter, backbone, saved, what, hint)
    head = _classifier_head(adapter, backbone, saved, what)
    missing = [k for k in head if k not in state]
    if missing:
        raise ModelError(f"{what}: the adapter brings a head but model.lora.train_head=false keeps ours frozen (and "
                         "unsaved); valid: model.lora.train_head=true")
    return head


def _cloze_scale(adapter, backbone, what) -> dict[str, torch.Tensor]:
    """The learned cloze scale (``model.cloze_scale=learned``): the adapter's, or 0 (scale 1) for an adapter
    trained without one."""
    theirs = adapter.head.get("cloze_log_scale")
    if backbone.log_scale is None:
        if theirs is not None:
            raise ModelError(f"{what}='{adapter.source}' was trained with a learned cloze scale; add "
                             "model.cloze_scale=learned")
        return {}
    return {"log_scale": (theirs if theirs is not None else torch.zeros(())).reshape(())}


def _answer_rows(adapter, backbone, saved, what, hint: str) -> dict[str, torch.Tensor]:
    ids = backbone.answer_token_ids.cpu()
    if "answer_rows" in adapter.head:
        theirs = adapter.head.get("answer_token_ids")
        if theirs is None or not torch.equal(theirs.long().cpu(), ids):
            raise ModelError(f"{what}='{adapter.source}': its answer rows are for tokens "
                             f"{None if theirs is None else theirs.tolist()}, this data's answer words are {ids.tolist()}")
        out = {"answer_rows": adapter.head["answer_rows"]}
        if "answer_bias" in adapter.head:
            out["answer_bias"] = adapter.head["answer_bias"]
    elif "lm_head" in saved:
        out = {"answer_rows": saved["lm_head"]["weight"][ids]}
        if "bias" in saved["lm_head"]:
            out["answer_bias"] = saved["lm_head"]["bias"][ids]
    else:
        extra = sorted(set(saved) - {"lm_head"})
        if extra:
            raise ModelError(f"{what}='{adapter.source}' also trains {extra} (modules_to_save), which model.head="
                             f"lm_choices does not use (it takes the answer rows of lm_head){hint}")
        return {}  # the pretrained LM-head rows of the fresh backbone
    if not backbone.answer_rows.requires_grad:
        raise ModelError(f"{what}: the adapter brings trained answer rows but model.lora.train_head=false keeps the "
                         "pretrained ones; valid: model.lora.train_head=true")
    return out


def _has_pooler(backbone) -> bool:
    return getattr(backbone.transformer.get_base_model(), "pooler", None) is not None


def _classifier_head(adapter, backbone, saved, what) -> dict[str, torch.Tensor]:
    pooling, shape = backbone.pooling, tuple(backbone.head.weight.shape)
    how = (f"put it as {HEAD_FILE} (head.weight {list(shape)}, head.bias [{shape[0]}]) in the adapter folder, train "
           "it with task_type=SEQ_CLS (peft saves the head as modules_to_save), or use a causal LM's "
           "model.head=lm_choices / lm_cloze (no extra weights)")
    if "head.weight" in adapter.head:
        want = adapter.meta.get("pooling")
        if want and want != pooling:
            raise ModelError(f"{what}='{adapter.source}': its head was trained on model.pooling={want}; add "
                             f"model.pooling={want}")
        w, b = adapter.head["head.weight"], adapter.head.get("head.bias")
        name = HEAD_FILE
    elif len(saved) == 1 and set(next(iter(saved.values()))) <= {"weight", "bias"}:
        name, tensors = next(iter(saved.items()))
        need = {"score": "last", "classifier": "pooler" if _has_pooler(backbone) else None}.get(name)
        if need is None:
            raise ModelError(f"{what}='{adapter.source}': its head '{name}' (modules_to_save) maps onto no head of ours; "
                             + how)
        if pooling != need:
            raise ModelError(f"{what}='{adapter.source}': its head '{name}' reads the "
                             f"{'last token' if need == 'last' else 'pooler output'}; add model.pooling={need}")
        w, b = tensors["weight"], tensors.get("bias")
    elif saved:
        raise ModelError(f"{what}='{adapter.source}': its head modules {sorted(saved)} (modules_to_save) are not one "
                         f"linear layer on features we compute; {how}")
    else:
        raise ModelError(f"{what}='{adapter.source}' has no classification head for model.head={backbone.head_kind}; "
                         + how)
    if tuple(w.shape) != shape:
        raise ModelError(f"{what}='{adapter.source}': head '{name}' has shape {tuple(w.shape)}, this task needs "
                         f"{shape} ({backbone.num_classes} classes)")
    return {"head.weight": w, "head.bias": torch.zeros(shape[0]) if b is None else b}


def load_adapter(backbone, source, mcfg, what: str = "method.adapter") -> PeftAdapter:
    """Read, check and load a PEFT adapter (+ head) into ``backbone``; returns what was read."""
    adapter = source if isinstance(source, PeftAdapter) else read_adapter(source, what)
    check_adapter(adapter, mcfg, what)
    backbone.load_trainable_state_dict(adapter_state(adapter, backbone, mcfg, what))
    log.info("loaded the LoRA adapter %s (%s) into model '%s'", adapter.source, adapter.path, mcfg.name)
    return adapter


def lora_settings(source, what: str = "method.adapter") -> dict:
    """``{"r", "alpha", "dropout", "target_modules"}`` of an adapter: the ``model.lora`` values it needs."""
    a = source if isinstance(source, PeftAdapter) else read_adapter(source, what)
    return {"r": int(a.config.get("r", 8)), "alpha": float(a.config.get("lora_alpha", 8)),
            "dropout": float(a.config.get("lora_dropout", 0.0)), "target_modules": a.target_modules()}

