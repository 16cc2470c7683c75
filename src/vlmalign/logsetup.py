"""One configured logger for the command line: plain ``message`` lines on stderr.

``vlmalign.*`` loggers print INFO and above; library progress bars (transformers' "Loading
weights", huggingface_hub's downloads) are switched off when stderr is not a terminal, where
each redraw would append another ~100 bytes to a log file.
"""

from __future__ import annotations

import logging
import sys


def configure_logging(level: int = logging.INFO, stream=None) -> None:
    stream = stream or sys.stderr
    root = logging.getLogger("vlmalign")
    if not any(getattr(h, "_vlmalign", False) for h in root.handlers):
        h = logging.StreamHandler(stream)
        h.setFormatter(logging.Formatter("%(message)s"))
        h._vlmalign = True
        root.addHandler(h)
    root.setLevel(level)
    if not getattr(stream, "isatty", lambda: False)():
        quiet_library_bars()


def quiet_library_bars() -> None:
    try:
        from transformers.utils import logging as tlog
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers is a dependency, but never fail on logging
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except Exception:  # pragma: no cover
        pass
