"""Progress on long work: a tqdm bar on a terminal, plain lines in a log file.

tqdm redraws its bar with carriage returns; in a file (nohup, SLURM, Kubernetes logs) about a thousand redraws
glue into one line. When stderr is not a terminal :func:`bar` gives a :class:`PlainProgress` instead: one line
every ``DISTSSL_PROGRESS_SECONDS`` (default 30) with the count, the rate, the last values shown and the time
left, and one at the end.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional


def bar(total: Optional[int] = None, initial: int = 0, desc: str = "", unit: str = "it", disable: bool = False,
        **tqdm_kwargs):
    """A progress bar: tqdm's on a terminal, :class:`PlainProgress` lines otherwise."""
    if not disable and not sys.stderr.isatty():
        return PlainProgress(total, initial, desc, unit)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, **tqdm_kwargs)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class PlainProgress:
    """The part of tqdm's interface distssl uses, as plain lines on stderr."""

    def __init__(self, total: Optional[int], initial: int = 0, desc: str = "", unit: str = "it",
                 every: Optional[float] = None):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.every = every if every is not None else float(os.environ.get("DISTSSL_PROGRESS_SECONDS", "30"))
        self.start_n, self.started = initial, time.monotonic()
        self.last = self.started
        self.postfix: dict = {}
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, values=None, refresh: bool = True, **kw) -> None:
        self.postfix = {**(values or {}), **kw}
        if refresh:
            self.refresh()

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def line(self) -> str:
        elapsed = max(1e-9, time.monotonic() - self.started)
        rate = (self.n - self.start_n) / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = f", {_duration((self.total - self.n) / rate)} left" if self.total and rate > 0 and self.n < self.total \
            else ""
        shown = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {done} {self.unit}{pct}, {rate:.3g} {self.unit}/s{shown}, {_duration(elapsed)}{left}"

    def _line(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.start_n:
                self._line()
