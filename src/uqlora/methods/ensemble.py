"""Deep ensemble of LoRA MAP runs: ``num_models`` independently seeded members (LoRA initialisation and
data order differ), pooled: the predictive averages their softmax. The members can also be trained as separate runs
(e.g. a multirun over seeds) and combined with ``eval.py ensemble=[dir1,dir2,...]``."""
from __future__ import annotations

from dataclasses import dataclass

from uqlora.methods import register
from uqlora.methods.base import UQMethod
from uqlora.schema import MethodConfig, at_least


@dataclass
class EnsembleConfig(MethodConfig):
    name: str = "ensemble"
    display_name: str = "Ensemble"
    num_models: int = at_least(1, 5)


@register("ensemble", EnsembleConfig)
class Ensemble(UQMethod):
    pass
