"""``model.precision=auto``: bf16 autocast where the hardware computes in bf16, float32 where it would emulate it.

On a CPU without native bf16 (no AVX512-BF16 or AMX, e.g. an AVX2-only AMD EPYC) every bf16 matmul is
converted in software: a SmolLM2-135M training step of the LLM table took ~110 s under ``bf16-mixed`` and ~6 s
under ``32-true`` on such a machine (2026-12-07, docs/running.md), while on an AMX CPU bf16 is the faster one.
``auto`` picks ``bf16-mixed`` on a CUDA GPU that supports bf16 and on a CPU with native bf16, ``32-true``
elsewhere; an explicit value is used as given (with a warning when it is bf16 on a CPU that emulates it).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_warned: set[str] = set()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles: the CPU instructions that make bf16 matmuls fast."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def _on_cuda(accelerator: str) -> bool:
    return str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available()


def effective_precision(precision, accelerator="cpu") -> str:
    """The Lightning precision string a run uses for ``model.precision`` / ``trainer.precision``."""
    precision = str(precision)
    if precision == "auto":
        if _on_cuda(accelerator):
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    if precision.startswith("bf16") and not _on_cuda(accelerator) and not cpu_has_native_bf16() \
            and precision not in _warned:
        _warned.add(precision)
        log.warning("precision=%s on a CPU without native bf16 (%s): bf16 is emulated, ~18x slower than 32-true "
                    "here; model.precision=auto picks 32-true on such a CPU", precision,
                    torch.backends.cpu.get_cpu_capability())
    return precision
