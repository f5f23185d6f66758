"""Progress for the loops outside the Lightning Trainer (post-hoc fits, sampling passes) and the line format
shared with :class:`uqlora.callbacks.progress.LineProgress`: a tqdm bar on a terminal; in a log file (``nohup``,
CI, a cluster's job log), where a bar is one unreadable line of carriage returns, a log line every 10% of the
items once the loop is older than ``quiet_s`` seconds -- a TFB sigma search over ARC runs two hours, a Laplace
KFAC pass 10-15 minutes.
"""
from __future__ import annotations

import logging
import math
import sys
import time

log = logging.getLogger(__name__)
PROGRESS_MODES = ("auto", "rich", "text", "none")
QUIET_S = 10.0  # a loop younger than this logs no line (track's default)


def resolve_progress_bar(value: str, stdout=None) -> str:
    """``auto`` -> ``rich`` on a terminal, else ``text``; the other values are returned as they are."""
    if value != "auto":
        return value
    out = sys.stdout if stdout is None else stdout
    return "rich" if getattr(out, "isatty", lambda: False)() else "text"


def track(iterable, desc: str, mode="auto", total: int | None = None, every: float = 0.1,
          quiet_s: float | None = None):
    """``iterable`` with progress: ``rich`` a tqdm bar (``auto`` on a terminal), ``text`` a log line
    ``<desc>: <n>/<N> (p%), <elapsed> elapsed, ~<rest> left`` every ``every`` of the items once the loop is older
    than ``quiet_s`` seconds (default :data:`QUIET_S`; short loops stay silent), ``none`` nothing. ``mode`` may
    be a bool: True = auto."""
    if isinstance(mode, bool):
        mode = "auto" if mode else "none"
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress mode {mode!r}; valid: {', '.join(PROGRESS_MODES)}")
    mode = resolve_progress_bar(mode)
    if mode == "none":
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if mode == "rich":
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False)
    if not 0 < every <= 1:
        raise ValueError(f"track: every={every!r}; valid: a fraction in (0, 1]")
    return _lines(iterable, desc, finite_total(total), every, QUIET_S if quiet_s is None else float(quiet_s))


def _lines(iterable, desc, total, every, quiet_s):
    ticker = Ticker(f"{desc}:", total, every, quiet_s)
    for item in iterable:
        yield item
        line = ticker.tick()
        if line:
            log.info(line)


class Ticker:
    """Counts the items of one loop; :meth:`tick` returns the progress line ``<label> n/N (p%), <elapsed> elapsed,
    ~<rest> left`` when one is due -- every ``every`` of the items (every 10th without a total) and at the last,
    once the loop is older than ``quiet_s`` seconds -- else None."""

    def __init__(self, label: str, total, every: float, quiet_s: float):
        self.label, self.total, self.quiet_s = label, finite_total(total), quiet_s
        self.stride = max(1, math.ceil(self.total * every)) if self.total else 10
        self.done = 0
        self.t0 = time.monotonic()

    def tick(self) -> str | None:
        self.done += 1
        elapsed = time.monotonic() - self.t0
        if elapsed < self.quiet_s or not (self.done % self.stride == 0 or self.done == self.total):
            return None
        left = self.total - self.done if self.total else None
        return ", ".join([position_text(self.label, self.done, self.total)] + timing_parts(elapsed, self.done, left))


def finite_total(total) -> int | None:
    return int(total) if total is not None and math.isfinite(total) else None


def position_text(what: str, n: int, total: int | None) -> str:
    """``step 100/250 (40%)``, or ``step 100`` when the total is unknown."""
    return f"{what} {n}/{total} ({100 * n / total:.0f}%)" if total else f"{what} {n}"


def timing_parts(elapsed: float, done: int, left: int | None) -> list[str]:
    """Elapsed time and, with ``done`` units behind and ``left`` to go, the estimate of the rest."""
    out = [f"{clock_text(elapsed)} elapsed"]
    if left is not None and done > 0:
        out.append(f"~{clock_text(elapsed / done * left)} left")
    return out


def clock_text(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
