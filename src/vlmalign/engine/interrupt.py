"""Ctrl-C and SIGTERM during training: finish the step, save, say how to resume, exit non-zero.

Inside :class:`StopSignals` the first SIGINT or SIGTERM only sets a flag; the training loop
checks it after each optimizer step (over all processes, so every rank stops at the same step),
writes a checkpoint atomically and raises :class:`TrainingInterrupted`. A second signal
abandons the current step at once (``KeyboardInterrupt``); the loop then raises
:class:`TrainingInterrupted` without writing anything new, naming the last checkpoint.
Clusters send SIGTERM before they kill a job, so a preempted run keeps its last step.
"""

from __future__ import annotations

import signal
import threading

from ..errors import VlmalignError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingInterrupted(VlmalignError):
    """A run stopped by a signal; ``exit_code`` is the shell's convention (128 + signal)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signum, 130)


class StopSignals:
    """Context manager: SIGINT/SIGTERM -> ``self.signum`` set (first), KeyboardInterrupt (second).

    Outside the main thread (where handlers cannot be installed) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        import logging
        logging.getLogger(__name__).warning(
            "%s received: finishing the current step, then saving a checkpoint (send it again to stop "
            "at once without saving)", signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in EXIT_CODES:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        return False


def resume_hint(output_dir: str) -> str:
    return (f"resume with the same command plus train.resume=true (output_dir {output_dir})")
