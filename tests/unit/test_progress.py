"""Progress without a terminal: a line every N seconds and one at the end, never a bar redrawn
into a file."""

from __future__ import annotations

import io
import logging

from vlmalign import progress as P


def test_without_a_terminal_progress_logs_lines_not_a_bar(monkeypatch, caplog):
    clock = {"t": 1000.0}
    monkeypatch.setattr(P.time, "time", lambda: clock["t"])
    monkeypatch.setattr(P, "is_terminal", lambda stream=None: False)
    caplog.set_level(logging.INFO, logger="vlmalign.progress")
    p = P.Progress(100, desc="train", seconds=30)
    assert p.bar is None
    for _ in range(100):
        clock["t"] += 1.0          # one second per step: a line every 30 steps
        p.update(1, loss="0.5")
    p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4      # steps 30, 60, 90 and the final line
    assert lines[0] == "train: step 30/100 (30%) elapsed 0:30 eta 1:10 loss=0.5"
    assert lines[-1].startswith("train: step 100/100 (100%)")


def test_progress_off_with_zero_seconds_prints_nothing(monkeypatch, caplog):
    monkeypatch.setattr(P, "is_terminal", lambda stream=None: False)
    caplog.set_level(logging.INFO, logger="vlmalign.progress")
    p = P.Progress(5, seconds=0)
    for _ in range(5):
        p.update(1)
    p.close()
    assert not caplog.records


def test_the_cli_logger_writes_plain_lines():
    from vlmalign.logsetup import configure_logging
    buf = io.StringIO()
    logger = logging.getLogger("vlmalign")
    old = list(logger.handlers)
    try:
        logger.handlers = []
        configure_logging(stream=buf)
        logging.getLogger("vlmalign.progress").info("train: step 1/2")
        assert buf.getvalue() == "train: step 1/2\n"
    finally:
        logger.handlers = old
