"""LoRA MAP: AdamW fine-tuning of the LoRA adapters (+ head). AdamW's decoupled weight decay plays
the role of a Gaussian prior's precision on the trainable parameters; the predictive is the softmax
of the fine-tuned logits."""
from __future__ import annotations

from dataclasses import dataclass

from uqlora.methods import register
from uqlora.methods.base import UQMethod
from uqlora.schema import MethodConfig


@dataclass
class MapConfig(MethodConfig):
    name: str = "map"
    display_name: str = "MAP"


@register("map", MapConfig)
class MAP(UQMethod):
    trains = True
