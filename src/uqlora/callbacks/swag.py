"""The SWAG phase of training as a Lightning callback (SWAG-LoRA, Onal et al. 2024).

From ``start`` (an epoch, or a step; a value in (0, 1) is a fraction of all training steps) on:

1. optionally reload the best adapter by validation loss (``reload_best``);
2. anneal the learning rate linearly from its current value to ``lr`` over ``anneal`` epochs/steps,
   then hold it (this overrides the main schedule for the rest of training);
3. collect a snapshot of the chosen parameters every ``collect_every`` epochs/steps.

The moments live in a :class:`uqlora.core.swag.SWAG`; the callback's ``state_dict`` holds them (and its
counters), so a run resumed from a Lightning checkpoint keeps its snapshots.

Under DDP the parameters are identical on every process after each step, so every process collects the same
snapshots into its own copy (collected once per process, never summed across processes); rank 0 alone writes
them (Lightning's checkpoints, ``method_state.pt``), and the copies are checked to agree at the end of fit.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch

from uqlora.core.swag import SWAG, flatten
from uqlora.errors import UqloraError

log = logging.getLogger(__name__)


def swag_parameters(backbone, which: str = "all") -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters SWAG covers: every trainable one (LoRA A/B + trained head) or LoRA only."""
    if which not in ("all", "lora"):
        raise UqloraError(f"unknown method.params '{which}'; valid choices: all, lora")
    return [(n, p) for n, p in backbone.named_parameters()
            if p.requires_grad and (which == "all" or "lora_" in n)]


class SWAGCallback(pl.Callback):
    def __init__(self, swag: SWAG, params: list[torch.nn.Parameter], start: float = 0.5, unit: str = "step",
                 collect_every: int = 10, lr: float = 1e-4, anneal: int = 0, reload_best: bool = True,
                 best_path: str | Path | None = None):
        if unit not in ("epoch", "step"):
            raise UqloraError(f"unknown method.unit '{unit}'; valid choices: epoch, step")
        if collect_every < 1:
            raise UqloraError(f"method.collect_every must be >= 1, got {collect_every}")
        self.swag, self.params = swag, params
        self.start, self.unit, self.every, self.lr, self.anneal = start, unit, int(collect_every), float(lr), int(anneal)
        self.reload_best, self.best_path = reload_best, Path(best_path) if best_path else None
        self.started_at = -1       # step (or epoch) at which the SWAG phase began
        self.base_lrs: list[float] = []
        self.last_collect = -1

    @property
    def state_key(self) -> str:
        return "SWAGCallback"

    # --- when ---------------------------------------------------------------------------------
    def _start_point(self, trainer) -> int:
        if 0 < self.start < 1:
            total = int(trainer.estimated_stepping_batches)
            if self.unit == "step":
                return int(self.start * total)
            return int(self.start * max(1, trainer.max_epochs))
        return int(self.start)

    def _now(self, trainer) -> int:
        return int(trainer.global_step if self.unit == "step" else trainer.current_epoch)

    def _begin(self, trainer, pl_module):
        if self.reload_best and self.best_path is not None:
            trainer.strategy.barrier("swag_reload_best")  # DDP: rank 0 alone writes the best adapter; wait for it
        if self.reload_best and self.best_path is not None and self.best_path.is_file():
            pl_module.backbone.load_trainable_state_dict(torch.load(self.best_path, weights_only=True))
            log.info("SWAG phase: reloaded the best adapter %s", self.best_path)
        self.base_lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
        self.started_at = self._now(trainer)
        log.info("SWAG phase starts at %s %d (lr -> %g, collect every %d)", self.unit, self.started_at, self.lr, self.every)

    def _set_lr(self, trainer):
        t = self._now(trainer) - self.started_at
        frac = 1.0 if self.anneal <= 0 else min(1.0, t / self.anneal)
        for g, lr0 in zip(trainer.optimizers[0].param_groups, self.base_lrs):
            g["lr"] = (1 - frac) * lr0 + frac * self.lr

    # --- hooks --------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer, pl_module):
        if self.unit == "epoch" and self.started_at < 0 and trainer.current_epoch >= self._start_point(trainer):
            self._begin(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.unit == "step" and self.started_at < 0 and trainer.global_step >= self._start_point(trainer):
            self._begin(trainer, pl_module)
        if self.started_at >= 0:
            self._set_lr(trainer)  # after the main scheduler's step: this value is the one used

    def _collect(self, now: int):
        self.swag.collect(flatten(self.params))
        self.last_collect = now
        log.info("SWAG snapshot %d at %s %d", self.swag.n, self.unit, now)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.unit == "step" and self.started_at >= 0:
            now = trainer.global_step  # steps completed
            if now > self.started_at and (now - self.started_at) % self.every == 0 and now != self.last_collect:
                self._collect(now)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.unit == "epoch" and self.started_at >= 0:
            now = trainer.current_epoch + 1  # epochs completed
            if (now - self.started_at) % self.every == 0 and now != self.last_collect:
                self._collect(now)

    def on_fit_end(self, trainer, pl_module):
        if trainer.world_size > 1:
            self._check_replicas(trainer)
        if self.swag.n == 0:
            log.warning("SWAG collected no snapshot: method.start is past the end of training "
                        "(start=%s %s, trained %d steps / %d epochs)", self.start, self.unit, trainer.global_step,
                        trainer.current_epoch)

    def _check_replicas(self, trainer) -> None:
        """Under DDP every process holds the same parameters after each optimiser step, so each collects the
        same snapshots: the moments are collected once per process, never summed across processes, and rank 0
        alone saves them. Checked here against rank 0's copy (one broadcast of the mean)."""
        ref = trainer.strategy.broadcast((self.swag.n, self.swag.mean.detach().cpu()), src=0)
        n0, mean0 = ref
        bad = n0 != self.swag.n or (self.swag.n and not torch.allclose(mean0, self.swag.mean.detach().cpu(),
                                                                       rtol=1e-5, atol=1e-7))
        # every rank learns whether any rank disagrees, so all raise together (no rank left in a barrier)
        if bool(trainer.strategy.reduce_boolean_decision(bool(bad), all=False)):
            raise UqloraError(f"SWAG moments differ across processes (rank {trainer.global_rank}: {self.swag.n} "
                              f"snapshots, rank 0: {n0}): the strategy does not keep the parameters replicated "
                              "(SWAG needs DDP, not a sharded strategy)")

    # --- resume -------------------------------------------------------------------------------
    def state_dict(self):
        return {"swag": self.swag.state_dict(), "started_at": self.started_at, "base_lrs": list(self.base_lrs),
                "last_collect": self.last_collect}

    def load_state_dict(self, state_dict):
        self.swag.load_state_dict(state_dict["swag"])
        self.started_at, self.base_lrs = int(state_dict["started_at"]), list(state_dict["base_lrs"])
        self.last_collect = int(state_dict["last_collect"])
