"""Calibration during training: the reliability diagram of the last validation pass, saved and sent to W&B
(the validation ECE itself is a torchmetrics metric of the method module, ``val/ece``)."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from uqlora.metrics import reliability_diagram


class CalibrationCallback(pl.Callback):
    """At the end of fit, the reliability diagram of the last validation pass (``plots/reliability_val.png``,
    also to W&B), over the whole validation split (all DDP processes' shares)."""

    def __init__(self, plot_dir: str | Path, n_bins: int = 15):
        self.plot_dir, self.n_bins = Path(plot_dir), int(n_bins)
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_validation_epoch_start(self, trainer, pl_module):
        self._probs, self._labels = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if outputs is not None:
            self._probs.append(outputs["probs"].float().cpu())
            self._labels.append(outputs["labels"].cpu())

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self._probs:
            return
        probs, labels = torch.cat(self._probs), torch.cat(self._labels)
        if trainer.world_size > 1:  # DDP: every process's share of the validation set, so ECE is over all of it
            import torch.distributed as dist

            parts = [None] * trainer.world_size
            dist.all_gather_object(parts, (probs, labels))
            probs, labels = torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts])
        self.last = (probs, labels)

    def on_fit_end(self, trainer, pl_module):
        if self.last is None:
            return
        from uqlora.logging_utils import log_image

        path = reliability_diagram(*self.last, self.plot_dir / "reliability_val.png", n_bins=self.n_bins,
                                   title=f"{pl_module.name}: validation (last epoch)")
        log_image(trainer.logger, "val/reliability", path)
