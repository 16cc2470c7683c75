"""Training progress: a bar on a terminal, a log line every N seconds anywhere else.

A tqdm bar redrawn into a file or a pipe appends ~110 bytes per step onto one line; when the
output is not a terminal (or the bar is off) the loop logs ``desc: step/total (pct) ... eta``
at most every ``seconds`` seconds, and once at the end.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("vlmalign.progress")


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, total: int, initial: int = 0, *, desc: str = "train", bar: bool = True,
                 seconds: float = 30.0, enabled: bool = True, unit: str = "step"):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.seconds = seconds
        self.enabled = enabled
        self.start_n = initial
        self.t0 = self.last = time.time()
        self.bar = None
        self.postfix = ""
        if enabled and bar and is_terminal():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, unit=unit)

    def line(self) -> str:
        done = self.n - self.start_n
        el = time.time() - self.t0
        eta = el / done * (self.total - self.n) if done else 0.0
        pct = 100.0 * self.n / self.total if self.total else 100.0
        extra = f" {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.unit} {self.n}/{self.total} ({pct:.0f}%) elapsed {_clock(el)} eta {_clock(eta)}{extra}"

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        self.postfix = " ".join(f"{k}={v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)
        elif self.enabled and self.seconds > 0 and time.time() - self.last >= self.seconds:
            self.last = time.time()
            log.info(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.seconds > 0 and self.n > self.start_n:
            log.info(self.line())
