"""Training progress as plain log lines, for runs whose output goes to a file (``nohup``, CI, a cluster's job log).

Rich's live progress bar draws nothing until the end when stdout is not a terminal, so a 20-minute training in
the background looked stuck. ``progress_bar=text`` (what ``auto`` picks without a terminal) logs one line every
5% of the optimiser steps instead: step, epoch, last training loss, elapsed time and an estimate of the rest --
and, for the prediction passes (a sampling method's test pass over ARC takes 15-25 minutes on a CPU), a line every
10% of the batches once a pass has run longer than ``quiet_s`` seconds. The loops outside the Trainer use
:func:`uqlora.progress.track`, with the same line format.
"""
from __future__ import annotations

import logging
import math
import time

from lightning.pytorch.callbacks import Callback

from uqlora.progress import Ticker, finite_total, position_text, timing_parts

log = logging.getLogger(__name__)


class LineProgress(Callback):
    """Logs ``train: step s/S (p%), epoch e/E, loss l, <elapsed> elapsed, ~<rest> left`` every ``every`` of the
    optimiser steps (and at the last one); ``predict: batch b/B (p%), <elapsed> elapsed, ~<rest> left`` every
    ``predict_every`` of a prediction pass's batches once the pass is older than ``quiet_s`` seconds (short passes
    stay silent)."""

    def __init__(self, every: float = 0.05, predict_every: float = 0.1, quiet_s: float = 10.0):
        for name, v in (("every", every), ("predict_every", predict_every)):
            if not 0 < v <= 1:
                raise ValueError(f"LineProgress: {name}={v!r}; valid: a fraction in (0, 1]")
        self.every, self.predict_every, self.quiet_s = every, predict_every, quiet_s

    def on_train_start(self, trainer, pl_module) -> None:
        self.total = finite_total(trainer.estimated_stepping_batches)
        self.stride = max(1, math.ceil(self.total * self.every)) if self.total else 50
        self.start_step = trainer.global_step
        self.t0 = time.monotonic()
        self.last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.last or not (step % self.stride == 0 or step == self.total):
            return
        self.last = step
        elapsed = time.monotonic() - self.t0
        done = step - self.start_step
        parts = ["train: " + position_text("step", step, self.total)]
        if trainer.max_epochs and trainer.max_epochs > 0:
            parts.append(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts += timing_parts(elapsed, done, self.total - step if self.total else None)
        if trainer.is_global_zero:
            log.info(", ".join(parts))

    def on_predict_start(self, trainer, pl_module) -> None:
        n = trainer.num_predict_batches
        self.predict_ticker = Ticker("predict: batch", sum(n) if isinstance(n, (list, tuple)) else n,
                                     self.predict_every, self.quiet_s)

    @property
    def p_done(self) -> int:
        """Batches of the current prediction pass so far."""
        return self.predict_ticker.done

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        line = self.predict_ticker.tick()
        if line and trainer.is_global_zero:
            log.info(line)
