"""Calibration during training: the reliability diagram of the last validation pass, saved and sent to W&B
(the validation ECE itself is a torchmetrics metric of the method module, ``val/ece``), and the confidence
direction of every validation pass -- mean top-label confidence against accuracy (``val/conf``, one log line
per pass, ``results.json`` ``train.val_history``): whether the model is becoming over- or underconfident as it
trains. Only the top-label confidence and correctness of each validation row are kept (a row: an example, or a
target token of token-level SFT, whose validation step returns them directly)."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


class CalibrationCallback(pl.Callback):
    """At the end of fit, the reliability diagram of the last validation pass (``plots/reliability_val.png``,
    also to W&B), over the whole validation split (all DDP processes' shares); after every pass, its accuracy
    and mean confidence (``history``, kept in ``last.ckpt`` so a resumed run keeps the passes before it)."""

    def __init__(self, plot_dir: str | Path, n_bins: int = 15):
        self.plot_dir, self.n_bins = Path(plot_dir), int(n_bins)
        self._conf: list[torch.Tensor] = []
        self._correct: list[torch.Tensor] = []
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def on_validation_epoch_start(self, trainer, pl_module):
        self._conf, self._correct = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if outputs is None:
            return
        if "confidence" in outputs:
            conf, correct = outputs["confidence"], outputs["correct"]
        else:
            conf, pred = outputs["probs"].float().max(-1)
            correct = pred == outputs["labels"]
        self._conf.append(conf.float().cpu())
        self._correct.append(correct.cpu())

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self._conf:
            return
        conf, correct = torch.cat(self._conf), torch.cat(self._correct)
        if trainer.world_size > 1:  # DDP: every process's share of the validation set, so ECE is over all of it
            import torch.distributed as dist

            parts = [None] * trainer.world_size
            dist.all_gather_object(parts, (conf, correct))
            conf, correct = torch.cat([c for c, _ in parts]), torch.cat([y for _, y in parts])
        self.last = (conf, correct)
        acc, mean_conf = float(correct.float().mean()), float(conf.mean())
        self.history.append({"step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                             "acc": round(acc, 4), "conf": round(mean_conf, 4), "n": int(conf.numel())})
        pl_module.log("val/conf", mean_conf, batch_size=int(conf.numel()))
        gap = mean_conf - acc
        direction = "overconfident" if gap > 0 else "underconfident"
        log.info("validation at step %d (epoch %d): accuracy %.3f, mean confidence %.3f -> %s by %.3f",
                 trainer.global_step, trainer.current_epoch, acc, mean_conf, direction, abs(gap))

    def on_fit_end(self, trainer, pl_module):
        if self.last is None:
            return
        from uqlora.logging_utils import log_image
        from uqlora.metrics.calibration import confidence_bins
        from uqlora.metrics.plots import plot_reliability

        conf, correct = self.last
        path = plot_reliability(confidence_bins(conf.numpy(), correct.numpy(), self.n_bins),
                                self.plot_dir / "reliability_val.png", title=f"{pl_module.name}: validation (last epoch)")
        log_image(trainer.logger, "val/reliability", path)
