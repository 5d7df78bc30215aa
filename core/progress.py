"""Progress that reads well in a terminal and in a log file.

On a terminal: a tqdm bar. Anywhere else (a redirected log, a batch job, CI) a bar is one endless line
of carriage returns, so `LogProgress` prints a plain line every `PROGRESS_INTERVAL_S` seconds and at
the end instead: count, percentage, rate, elapsed time and ETA.
"""

from __future__ import annotations

import sys
import time

PROGRESS_INTERVAL_S = 30.0


def _clock_text(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogProgress:
    """The part of tqdm's interface the stages use (update, set_postfix, close, context manager)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, stream=None,
                 interval: float | None = None, clock=time.monotonic, unit_scale: bool = False):
        self.total, self.desc, self.unit, self.n, self.initial = total, desc, unit, initial, initial
        self.unit_scale = unit_scale  # counts and rate with SI prefixes (bytes), as tqdm's unit_scale
        self.stream = stream or sys.stderr
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.clock = clock
        self.started = self.last = clock()
        self.postfix: dict = {}
        self.shown = None  # the count of the last printed line

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.interval:
            self.show()

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def show(self) -> None:
        now = self.clock()
        self.last, self.shown = now, self.n
        elapsed = now - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        line = f"{self.desc}: {self._amount(self.n)}"
        line += f"/{self._amount(self.total)} ({100 * self.n / self.total:.0f}%)" if self.total else ""
        line += f", {self._amount(rate) + self.unit if self.unit_scale else f'{rate:.3g} {self.unit}'}/s"
        line += f", elapsed {_clock_text(elapsed)}"
        if self.total and rate > 0:
            line += f", ETA {_clock_text((self.total - self.n) / rate)}"
        if self.postfix:
            line += ", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        print(line, file=self.stream, flush=True)

    def _amount(self, n: float) -> str:
        if not self.unit_scale:
            return str(n)
        from tqdm import tqdm

        return tqdm.format_sizeof(n)

    def close(self) -> None:
        if self.shown != self.n:
            self.show()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def library_bars_off_a_terminal() -> None:
    """transformers draws its own bars (loading weights): off a terminal they would be carriage-return noise."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
             unit_scale: bool = False):
    """A tqdm bar on a terminal, `LogProgress` lines elsewhere; nothing with `disable`."""
    from tqdm.auto import tqdm

    if disable or sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, dynamic_ncols=True,
                    unit_scale=unit_scale)
    return LogProgress(total, desc, unit, initial, unit_scale=unit_scale)
