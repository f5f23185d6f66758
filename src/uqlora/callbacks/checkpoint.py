"""Keep the adapter + head of the best validation loss, and nothing else.

Lightning's own checkpoints pickle hyper-parameters and optimiser state; this callback stores only
the trainable tensors (``Backbone.trainable_state_dict``), written atomically, and loadable with
``torch.load(weights_only=True)``. Its own state (best score and step) survives a resume.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import torch

from uqlora.io import atomic_torch_save

log = logging.getLogger(__name__)


class BestAdapterCheckpoint(pl.Callback):
    def __init__(self, dirpath: str | Path, monitor: str = "val/loss", filename: str = "best_adapter.pt"):
        self.path = Path(dirpath) / filename
        self.monitor = monitor
        self.best = math.inf
        self.best_step = -1

    @property
    def state_key(self) -> str:
        return f"BestAdapterCheckpoint[{self.monitor}]"

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if math.isfinite(score) and score < self.best:
            self.best, self.best_step = score, int(trainer.global_step)
            atomic_torch_save(pl_module.backbone.trainable_state_dict(), self.path)
            log.info("best %s=%.4f at step %d -> %s", self.monitor, score, self.best_step, self.path)

    def restore_best(self, pl_module) -> bool:
        """Load the best adapter into the module; False when no validation ever ran."""
        if not self.path.is_file():
            return False
        pl_module.backbone.load_trainable_state_dict(torch.load(self.path, weights_only=True, map_location="cpu"))
        return True

    def state_dict(self):
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state_dict):
        self.best, self.best_step = float(state_dict["best"]), int(state_dict["best_step"])
