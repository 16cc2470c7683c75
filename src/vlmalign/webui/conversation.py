"""What the web page does, without the page: one browser tab's conversation with one model, or
with two side by side (the same messages and images to each), a turn streamed pane after pane.
Every failure becomes an ``error: ...`` status line and leaves every conversation as it was."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from ..data.images import DEFAULT_MAX_PIXELS
from ..errors import DataError, VlmalignError
from ..rollout.chat import ChatSession
from ..rollout.generate import SamplingConfig
from .render import history
from .stream import Generation, Stopped
from .uploads import read_upload

log = logging.getLogger("vlmalign.webui")


@dataclass
class ChatModel:
    name: str             # shown above its answers
    adapter: Any
    image_position: str = "before"   # where a message's image goes relative to its text


@dataclass
class Update:
    """What the page shows after a step: one chat history per model (a Chatbot's messages), a
    status line, and whether the message and image were sent (the page then clears them)."""
    histories: list[list[dict]]
    status: str = ""
    sent: bool = False


@dataclass
class WebChat:
    """The models and the settings every tab starts from."""
    models: list[ChatModel]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    image_root: str | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def conversation(self) -> "Conversation":
        return Conversation(self)


class Conversation:
    """A ChatSession per model, the file each image was shown from, and the turn in progress."""

    def __init__(self, chat: WebChat):
        self.chat = chat
        s = chat.sampling
        self.sessions = [ChatSession(m.adapter, chat.image_root, s.max_new_tokens, s.temperature, s.top_p,
                                     s.top_k, image_position=m.image_position, max_pixels=chat.max_pixels)
                         for m in chat.models]
        for session in self.sessions:
            session.image_hint = "by uploading it"
        self.shown: dict[str, str] = {}   # image key -> the file the page shows it from
        self._lock = threading.Lock()
        self._turn: Generation | None = None
        self._epoch = 0   # counts stops: a turn that sees it change ends
        self._before: list[list] | None = None   # the conversations before the turn in progress

    def histories(self, live: list | None = None) -> list[list[dict]]:
        return [history(s.messages, self.shown, *((live and live[i]) or ())) for i, s in enumerate(self.sessions)]

    def send(self, text: str, image_file: str | None, temperature: float, top_p: float,
             max_new_tokens: float) -> Iterator[Update]:
        """Ask every model ``text`` (with the image in ``image_file``, if any); yields what to show."""
        text = (text or "").strip()
        try:
            cfg = self._sampling(temperature, top_p, max_new_tokens)
            msgs = self._messages(text, image_file)
        except VlmalignError as e:
            yield Update(self.histories(), f"error: {e}")
            return
        finally:
            for s in self.sessions:
                s.pending = []
        with self._lock:   # turns of one tab never overlap: the page queues them (one at a time)
            self._before = before = [list(s.messages) for s in self.sessions]
            epoch = self._epoch
        live = [(m, None) for m in msgs]   # (user message, answer so far) per pane; None once answered
        yield Update(self.histories(live), "", sent=True)
        try:
            for i, s in enumerate(self.sessions):
                if self._epoch != epoch:   # stopped or reset between two panes
                    raise Stopped("stopped")
                s.max_new_tokens, s.temperature, s.top_p = cfg.max_new_tokens, cfg.temperature, cfg.top_p
                s.pending = list(msgs[i].images)
                self._turn = Generation(s, text)
                for answer in self._turn:   # the last, whole answer comes once the session holds it
                    live[i] = (msgs[i], answer) if len(s.messages) == len(before[i]) else None
                    yield Update(self.histories(live), sent=True)
        except Stopped:
            self._rollback()
            yield Update(self.histories(), "stopped: the conversation is as it was before that message")
            return
        except Exception as e:   # noqa: BLE001 - the page shows it and keeps working
            if not isinstance(e, VlmalignError):
                log.exception("generation failed")
            self._rollback()
            yield Update(self.histories(), f"error: {e if isinstance(e, VlmalignError) else repr(e)}")
            return
        else:
            with self._lock:
                self._before = None   # every pane answered: the turn stays
        finally:
            self._turn = None
            self._rollback()   # a turn left unfinished (the page closed the stream) does not stay either
            for s in self.sessions:
                s.pending = []

    def stop(self) -> None:
        """End the answer in progress, if any (its turn is then rolled back)."""
        self._epoch += 1
        turn = self._turn
        if turn is not None:
            turn.stop()
        self._rollback()

    def reset(self) -> Update:
        """Forget the conversation (an answer in progress is stopped first)."""
        self.stop()
        for s in self.sessions:
            s.reset()
        self.shown = {}
        return Update(self.histories(), "conversation reset")

    def _rollback(self) -> None:
        with self._lock:
            if self._before is not None:
                for s, before in zip(self.sessions, self._before):
                    s.messages = before
                self._before = None

    def _sampling(self, temperature, top_p, max_new_tokens) -> SamplingConfig:
        from ..config import validate_config
        try:
            cfg = replace(self.chat.sampling, temperature=float(temperature), top_p=float(top_p),
                          max_new_tokens=int(max_new_tokens))
        except (TypeError, ValueError):
            raise VlmalignError(f"sampling settings must be numbers, got temperature={temperature!r}, "
                                f"top_p={top_p!r}, max new tokens={max_new_tokens!r}") from None
        validate_config(cfg)
        return cfg

    def _messages(self, text: str, image_file: str | None) -> list:
        """The user message each model gets (its image placed as that model expects), the image
        checked (pixel budget) by each model's loader."""
        if not text:
            raise VlmalignError("type a message" + (" to send with the image" if image_file else ""))
        for s in self.sessions:
            s.message(text)   # a typed image placeholder is refused before anything is sent
        if image_file:
            ref = read_upload(image_file)
            try:
                for s in self.sessions:
                    s.add_ref(ref)
            except DataError as e:   # said of the upload, not of "field 'image'" of a data record
                raise VlmalignError("the uploaded image: " + e.reason.replace("image given as bytes ", "")
                                    .replace(" given as bytes", "")) from None
            self.shown[ref.key()] = image_file
        return [s.message(text) for s in self.sessions]
