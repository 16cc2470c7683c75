"""One :class:`~vlmalign.rollout.chat.ChatSession` turn as a stream of the answer so far: the
generation runs in a thread, its streamer writes each decoded piece into a queue, the reader
iterates. :meth:`Generation.stop` ends it early from any thread."""

from __future__ import annotations

import queue
import threading
from typing import Iterator


class Stopped(Exception):
    """The answer was stopped (the page's Stop or Reset button) before it was complete."""


class Generation:
    """``session.ask(text)`` running in a thread; iterate for the answer so far after each piece,
    the last value being the whole answer as ``ask`` returns it. Iterating raises what ``ask``
    raised (:class:`Stopped` after :meth:`stop`); a stopped or failed turn leaves the session's
    conversation as it was before ``text`` (ChatSession's promise)."""

    def __init__(self, session, text: str):
        self._pieces: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._result: dict = {}
        self._thread = threading.Thread(target=self._run, args=(session, text), daemon=True,
                                        name="vlmalign-webui-generate")
        self._thread.start()

    def _run(self, session, text):
        try:
            self._result["answer"] = session.ask(text, out=self)
        except BaseException as e:   # handed to the reader, raised there
            self._result["error"] = e
        finally:
            self._done.set()
            self._pieces.put(None)

    def write(self, text: str) -> None:   # the session's streamer writes here
        if self._stopping.is_set():
            raise Stopped("stopped")     # raised inside generate: the generation ends at this token
        self._pieces.put(text)

    def flush(self) -> None:
        pass

    def stop(self, wait_s: float = 120.0) -> None:
        """Ask the generation to end at its next token and wait (at most ``wait_s``) until it has."""
        self._stopping.set()
        self._done.wait(wait_s)

    def __iter__(self) -> Iterator[str]:
        shown = ""
        try:
            while (piece := self._pieces.get()) is not None:
                shown += piece
                yield shown.strip()
        finally:   # the reader went away (a closed page): end the generation too
            self.stop()
        if "error" in self._result:
            raise self._result["error"]
        yield self._result["answer"]
