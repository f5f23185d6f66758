"""MC dropout: the MAP model with its dropout (LoRA dropout, and the base model's and head's dropout when
``all_dropout``) kept active at test time; the predictive averages the softmax over S stochastic passes.
The dropout masks come from the global torch RNG, seeded with ``eval_seed`` at the start of prediction.
``method.map_run=<run dir>``: no training, the dropout predictive of that finished run's adapter."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from uqlora.errors import UqloraError
from uqlora.methods import register
from uqlora.methods.base import UQMethod
from uqlora.schema import MethodConfig, at_least


@dataclass
class MCDropoutConfig(MethodConfig):
    name: str = "mc_dropout"
    display_name: str = "MC dropout"
    num_samples: int = at_least(1, 15)  # S stochastic forward passes
    all_dropout: bool = False  # also the base model's dropout layers, not only LoRA dropout (+ head dropout)
    eval_seed: int = 0
    map_run: Optional[str] = None  # a finished run directory whose adapter is used instead of training


@register("mc_dropout", MCDropoutConfig)
class MCDropout(UQMethod):
    supports_generation = True  # token-level SFT (generation data)
    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.dropouts = [m for n, m in backbone.named_modules() if isinstance(m, nn.Dropout)
                         and (self.mcfg.all_dropout or "lora_dropout" in n or n == "dropout")]
        if not any(m.p > 0 for m in self.dropouts):
            raise UqloraError("mc_dropout needs dropout: set model.lora.dropout > 0 (e.g. 0.1)")

    def start_predict(self):
        torch.manual_seed(int(self.mcfg.eval_seed))

    def predictive_samples(self, batch) -> torch.Tensor:
        for m in self.dropouts:
            m.train()
        try:
            return torch.stack([self(batch).softmax(-1) for _ in range(int(self.mcfg.num_samples))])
        finally:
            for m in self.dropouts:
                m.eval()

    def num_weight_samples(self) -> int:
        return int(self.mcfg.num_samples)

    @contextlib.contextmanager
    def weight_sample(self, s: int):
        """Dropout active (in generation the masks are redrawn at every decoding step, as at test time)."""
        for m in self.dropouts:
            m.train()
        try:
            yield
        finally:
            for m in self.dropouts:
                m.eval()
