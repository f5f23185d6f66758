"""LoRA MAP: AdamW fine-tuning of the LoRA adapters (+ head). AdamW's decoupled weight decay plays
the role of a Gaussian prior's precision on the trainable parameters; the predictive is the softmax
of the fine-tuned logits. ``method=label_smoothing``: the same with uniform label smoothing (UAL's baseline)."""
from __future__ import annotations

from dataclasses import dataclass

from uqlora.errors import UqloraError
from uqlora.methods import register
from uqlora.methods.base import UQMethod
from uqlora.schema import HALF_OPEN_UNIT, MethodConfig, rule


@dataclass
class MapConfig(MethodConfig):
    name: str = "map"
    display_name: str = "MAP"


@register("map", MapConfig)
class MAP(UQMethod):
    trains = True
    supports_generation = True  # token-level SFT (generation data)


@dataclass
class LabelSmoothingConfig(MethodConfig):
    name: str = "label_smoothing"
    display_name: str = "LS"
    eps: float = rule(0.1, HALF_OPEN_UNIT)  # the smoothing of every example / target token


@register("label_smoothing", LabelSmoothingConfig)
class LabelSmoothing(MAP):
    """MAP training with uniform label smoothing ``method.eps`` (UAL's baseline): ``loss.label_smoothing`` as a
    method option of its own."""

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        if self.label_smoothing:
            raise UqloraError(f"method=label_smoothing sets the smoothing (method.eps); loss.label_smoothing must be 0, "
                              f"got {self.label_smoothing}")
        self.label_smoothing = float(self.mcfg.eps)
