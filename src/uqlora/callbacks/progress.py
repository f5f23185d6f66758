"""Training progress as plain log lines, for runs whose output goes to a file (``nohup``, CI, a cluster's job log).

Rich's live progress bar draws nothing until the end when stdout is not a terminal, so a 20-minute training in
the background looked stuck. ``progress_bar=text`` (what ``auto`` picks without a terminal) logs one line every
5% of the optimiser steps instead: step, epoch, last training loss, elapsed time and an estimate of the rest.
"""
from __future__ import annotations

import logging
import math
import sys
import time

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

def resolve_progress_bar(value: str, stdout=None) -> str:
    """``auto`` -> ``rich`` on a terminal, else ``text``; the other values are returned as they are."""
    if value != "auto":
        return value
    out = sys.stdout if stdout is None else stdout
    return "rich" if getattr(out, "isatty", lambda: False)() else "text"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class LineProgress(Callback):
    """Logs ``train: step s/S (p%), epoch e/E, loss l, <elapsed> elapsed, ~<rest> left`` every ``every`` of the
    optimiser steps (and at the last one)."""

    def __init__(self, every: float = 0.05):
        if not 0 < every <= 1:
            raise ValueError(f"LineProgress: every={every!r}; valid: a fraction in (0, 1]")
        self.every = every

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.estimated_stepping_batches
        self.total = int(total) if total is not None and math.isfinite(total) else None
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
        parts = [f"train: step {step}/{self.total} ({100 * step / self.total:.0f}%)" if self.total
                 else f"train: step {step}"]
        if trainer.max_epochs and trainer.max_epochs > 0:
            parts.append(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{_clock(elapsed)} elapsed")
        if self.total and done > 0:
            parts.append(f"~{_clock(elapsed / done * (self.total - step))} left")
        if trainer.is_global_zero:
            log.info(", ".join(parts))
