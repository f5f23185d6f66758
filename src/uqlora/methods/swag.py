"""SWAG-LoRA (Onal et al. 2024) and MultiSWAG.

Training is MAP training; from ``start`` on, :class:`uqlora.callbacks.swag.SWAGCallback` anneals the
learning rate to ``lr`` and collects snapshots of the LoRA (+ head) parameters into
:class:`uqlora.core.swag.SWAG`. The predictive averages the softmax over ``num_samples`` weight draws.
The S draws are made once per evaluation from a generator seeded with ``eval_seed`` and shared by every
batch, so each sample is one function over the whole evaluation set (not per-batch noise).
MultiSWAG = ``num_models`` independently seeded SWAG runs, pooled over their M x S samples.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from uqlora.callbacks.swag import SWAGCallback, swag_parameters
from uqlora.core.swag import SWAG, assign
from uqlora.errors import UqloraError
from uqlora.methods import register
from uqlora.methods.base import UQMethod
from uqlora.schema import POSITIVE, Choice, MethodConfig, at_least, non_negative, optional, rule

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Unit(Choice):
    epoch = "epoch"
    step = "step"


class Params(Choice):
    all = "all"
    lora = "lora"


class Dtype(Choice):
    float32 = "float32"
    float64 = "float64"


@dataclass
class SwagConfig(MethodConfig):
    name: str = "swag"
    display_name: str = "SWAG"
    start: float = non_negative(0.5)  # epoch / step at which the SWAG phase begins; in (0, 1): that fraction of training
    unit: Unit = Unit.step            # epoch | step (units of start, collect_every, anneal)
    collect_every: int = at_least(1, 10)  # snapshot period
    lr: Optional[float] = rule(None, optional(POSITIVE))  # SWAG-phase learning rate (annealed to); null: optim.lr / 2
    anneal: int = at_least(0, 0)      # length of the linear annealing to lr (0: switch at once)
    max_rank: int = at_least(2, 5)    # K: deviation columns kept (the low-rank part of the covariance)
    diag_only: bool = False           # sample with the diagonal covariance only
    scale: float = non_negative(1.0)  # covariance scale at sampling time
    num_samples: int = at_least(1, 15)  # S
    params: Params = Params.all       # all: LoRA A/B + trained head | lora: LoRA only
    reload_best: bool = True          # start the SWAG phase from the best adapter by validation loss
    var_floor: float = non_negative(1e-30)
    dtype: Dtype = Dtype.float32      # moment accumulation: float32 | float64
    eval_seed: int = 0                # seed of the S weight draws
    num_models: int = at_least(1, 1)  # M > 1: MultiSWAG


@register("swag", SwagConfig)
class SWAGMethod(UQMethod):
    supports_generation = True  # token-level SFT (generation data)
    restore_best_after_fit = False  # the SWAG mean, not the best MAP adapter, is what SWAG predicts with

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        named = swag_parameters(backbone, str(self.mcfg.params))
        self.swag_names, self.swag_params = [n for n, _ in named], [p for _, p in named]
        self.swag = SWAG(sum(p.numel() for p in self.swag_params), max_rank=int(self.mcfg.max_rank),
                         var_floor=float(self.mcfg.var_floor), dtype=DTYPES[str(self.mcfg.dtype)])
        self._draws: torch.Tensor | None = None
        self.swag_lr = float(self.mcfg.lr) if self.mcfg.lr is not None else float(cfg.optim.lr) / 2

    def extra_callbacks(self, member_dir):
        c = self.mcfg
        return [SWAGCallback(self.swag, self.swag_params, start=float(c.start), unit=str(c.unit),
                             collect_every=int(c.collect_every), lr=self.swag_lr, anneal=int(c.anneal),
                             reload_best=bool(c.reload_best), best_path=member_dir / "checkpoints" / "best_adapter.pt")]

    def posthoc_fit(self, datamodule) -> None:
        if self.swag.n == 0:
            raise UqloraError("SWAG collected no snapshot: method.start is after the end of training "
                              f"(start={self.mcfg.start} {self.mcfg.unit}); lower it or train longer")
        if self.swag.n < self.swag.K and not self.mcfg.get("diag_only", False):
            msg = (f"SWAG collected {self.swag.n} snapshot(s), fewer than K={self.swag.K} (method.max_rank): sampling "
                   f"with a rank-{self.swag.rank} deviation matrix" + (" (diagonal only)" if self.swag.rank < 2 else "")
                   + "; train longer or collect more often (method.collect_every) for the full low-rank part")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
        assign(self.swag_params, self.swag.mean)  # the SWA mean is the point estimate kept in adapter.pt
        self.fitted = True

    def start_predict(self):
        if self.swag.n == 0:
            raise UqloraError("SWAG predictive before any snapshot was collected (no fitted SWAG state)")
        g = torch.Generator().manual_seed(int(self.mcfg.eval_seed))
        self._draws = torch.stack([self.swag.sample(float(self.mcfg.scale), generator=g,
                                                    diag_only=bool(self.mcfg.diag_only))
                                   for _ in range(int(self.mcfg.num_samples))])

    def end_predict(self):
        assign(self.swag_params, self.swag.mean)
        self._draws = None

    def predictive_samples(self, batch) -> torch.Tensor:
        if self._draws is None:
            self.start_predict()
        out = []
        for draw in self._draws:
            assign(self.swag_params, draw)
            out.append(self(batch).softmax(-1))
        assign(self.swag_params, self.swag.mean)
        return torch.stack(out)

    def num_weight_samples(self) -> int:
        return int(self.mcfg.num_samples)

    @contextlib.contextmanager
    def weight_sample(self, s: int):
        if self._draws is None:
            self.start_predict()
        assign(self.swag_params, self._draws[int(s)])
        try:
            yield
        finally:
            assign(self.swag_params, self.swag.mean)

    def method_state_dict(self):
        return {**self.swag.state_dict(), "param_names": list(self.swag_names)}

    def load_method_state_dict(self, state):
        if not state:
            raise UqloraError("this run directory has no SWAG state (checkpoints/method_state.pt is empty)")
        if list(state["param_names"]) != self.swag_names:
            raise UqloraError("the SWAG state was collected over other parameters than this model's "
                              f"({len(state['param_names'])} vs {len(self.swag_names)} tensors)")
        self.swag.load_state_dict({k: v for k, v in state.items() if k != "param_names"})
        assign(self.swag_params, self.swag.mean)
        self.fitted = True


@dataclass
class MultiSwagConfig(SwagConfig):
    name: str = "multiswag"
    display_name: str = "MultiSWAG"
    num_models: int = at_least(1, 3)


@register("multiswag", MultiSwagConfig)
class MultiSWAGMethod(SWAGMethod):
    """M independently seeded SWAG runs (``num_models``), pooled by the pipeline over M x S samples."""
