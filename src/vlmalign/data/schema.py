"""The one internal schema every reader produces and everything downstream consumes.

Record kinds (nothing downstream knows file formats):

* :class:`Conversation` -- messages of text and image parts, 0..n images (SFT, captions).
* :class:`PreferencePair` -- a prompt (messages ending with a user turn), a chosen and a
  rejected response, optionally other images for the rejected side.
* :class:`RankedList` -- a prompt and two or more responses, best first.
* :class:`UnpairedExample` -- a prompt, one completion and whether it is desirable (KTO).
* :class:`RLPrompt` -- a prompt with an optional reference answer (RL, VQA evaluation).

Images are :class:`ImageRef` values: a path relative to an image root (resolved and confined
by :mod:`vlmalign.data.images`), or raw encoded bytes (parquet / HF datasets). Each record keeps
``source`` (file) and ``index`` (position in that file) so later errors can name it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ..errors import DataError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class ImageRef:
    """An image: ``path`` (relative to the image root, or absolute inside it) or ``data`` bytes."""

    path: str | None = None
    data: bytes | None = None

    def __post_init__(self):
        if (self.path is None) == (self.data is None):
            raise ValueError("ImageRef needs exactly one of path or data")

    def key(self) -> str:
        """A stable identity: the path, or a hash of the bytes (used to share encodings)."""
        if self.path is not None:
            return "path:" + self.path
        return "sha1:" + hashlib.sha1(self.data).hexdigest()

    def to_json(self) -> Any:
        if self.path is not None:
            return self.path
        return {"bytes_sha1": hashlib.sha1(self.data).hexdigest()}


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class ImagePart:
    image: ImageRef
    type: Literal["image"] = "image"


Part = Union[TextPart, ImagePart]


@dataclass
class Message:
    role: str
    content: list[Part]

    @property
    def text(self) -> str:
        """Concatenated text of this message (image parts omitted)."""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[ImageRef]:
        return [p.image for p in self.content if isinstance(p, ImagePart)]

    @staticmethod
    def user(*parts: str | ImageRef) -> "Message":
        return Message("user", _parts(parts))

    @staticmethod
    def assistant(text: str) -> "Message":
        return Message("assistant", [TextPart(text)])

    @staticmethod
    def system(text: str) -> "Message":
        return Message("system", [TextPart(text)])


def _parts(items) -> list[Part]:
    out: list[Part] = []
    for it in items:
        if isinstance(it, ImageRef):
            out.append(ImagePart(it))
        elif isinstance(it, (TextPart, ImagePart)):
            out.append(it)
        else:
            out.append(TextPart(str(it)))
    return out


def images_of(messages: list[Message]) -> list[ImageRef]:
    """All images of a message list, in the order they appear."""
    return [img for m in messages for img in m.images]


@dataclass
class _Record:
    source: str | None = field(default=None, kw_only=True)
    index: int | None = field(default=None, kw_only=True)
    id: str | None = field(default=None, kw_only=True)
    meta: dict = field(default_factory=dict, kw_only=True)
    # the kind the file held when the record was read as another one (data.kinds.coerce)
    read_from: str | None = field(default=None, kw_only=True, compare=False, repr=False)
    # the number of images one ``<image>`` placeholder stood for when the file wrote a single
    # placeholder for all of the record's images (Vision-LLM-Alignment's multi-image SFT
    # layout); the messages hold one image part per image. None: one placeholder per image
    one_placeholder_for: int | None = field(default=None, kw_only=True, compare=False, repr=False)

    def error(self, reason: str, field: str | None = None) -> DataError:
        return DataError(reason, file=self.source, index=self.index, field=field)


@dataclass
class Conversation(_Record):
    messages: list[Message]
    kind: Literal["conversation"] = field(default="conversation", init=False)

    @property
    def images(self) -> list[ImageRef]:
        return images_of(self.messages)


@dataclass
class PreferencePair(_Record):
    prompt: list[Message]
    chosen: str
    rejected: str
    # Images shown with the rejected response instead of the prompt's images (same count),
    # e.g. a corrupted image for mDPO-style conditional preference. None: same images.
    rejected_images: list[ImageRef] | None = None
    kind: Literal["preference"] = field(default="preference", init=False)

    @property
    def images(self) -> list[ImageRef]:
        return images_of(self.prompt)


@dataclass
class RankedList(_Record):
    prompt: list[Message]
    responses: list[str]  # best first, two or more
    scores: list[float] | None = None
    kind: Literal["ranked"] = field(default="ranked", init=False)

    @property
    def images(self) -> list[ImageRef]:
        return images_of(self.prompt)

    def pairs(self) -> list[PreferencePair]:
        """Every (better, worse) pair implied by the ranking."""
        out = []
        for i in range(len(self.responses)):
            for j in range(i + 1, len(self.responses)):
                out.append(PreferencePair(self.prompt, self.responses[i], self.responses[j],
                                          source=self.source, index=self.index, id=self.id,
                                          one_placeholder_for=self.one_placeholder_for))
        return out


@dataclass
class UnpairedExample(_Record):
    prompt: list[Message]
    completion: str
    label: bool  # True: desirable
    kind: Literal["unpaired"] = field(default="unpaired", init=False)

    @property
    def images(self) -> list[ImageRef]:
        return images_of(self.prompt)


@dataclass
class RLPrompt(_Record):
    prompt: list[Message]
    reference: str | None = None
    kind: Literal["rl_prompt"] = field(default="rl_prompt", init=False)

    @property
    def images(self) -> list[ImageRef]:
        return images_of(self.prompt)


Record = Union[Conversation, PreferencePair, RankedList, UnpairedExample, RLPrompt]
RECORD_KINDS = ("conversation", "preference", "ranked", "unpaired", "rl_prompt")


UNANSWERED_END = ("the conversation ends with a user turn that has no answer: training learns "
                  "from the turns before it only (read the file as kind rl_prompt to use that "
                  "turn as the prompt)")


def unanswered_end(rec: Record) -> bool:
    """True for a conversation whose last turn is a user turn without an answer."""
    return isinstance(rec, Conversation) and bool(rec.messages) and rec.messages[-1].role == "user"


def check_record(rec: Record, *, as_prompt: bool = False) -> None:
    """Structural checks shared by every reader; raise :class:`DataError` naming the field.

    Checks roles, non-empty responses, prompts that end with a user turn, image counts of
    rejected-side images, and two or more ranked responses. A conversation needs an answer
    -- unless ``as_prompt`` (it is read as ``rl_prompt``) and it ends with a user turn, which
    is then the prompt. (A conversation that ends with an unanswered user turn is kept, see
    :func:`unanswered_end`.) File-level checks (images that exist and decode, lengths for a
    model) live in :mod:`vlmalign.data.validate`.
    """
    msgs = rec.messages if isinstance(rec, Conversation) else rec.prompt
    fname = "messages" if isinstance(rec, Conversation) else "prompt"
    if not msgs:
        raise rec.error("no messages", fname)
    for i, m in enumerate(msgs):
        if m.role not in ROLES:
            raise rec.error(f"unknown role {m.role!r} (expected one of {', '.join(ROLES)})",
                            f"{fname}[{i}].role")
        if not m.content:
            raise rec.error("empty message", f"{fname}[{i}].content")
        if m.role == "assistant" and m.images:
            raise rec.error("images in an assistant turn are not supported", f"{fname}[{i}].content")
    if isinstance(rec, Conversation):
        if not (as_prompt and unanswered_end(rec)) and not any(m.role == "assistant" for m in msgs):
            raise rec.error("conversation has no assistant turn", "messages")
        for i, m in enumerate(msgs):
            if m.role == "assistant" and not m.text.strip():
                raise rec.error("empty assistant response", f"messages[{i}]")
        return
    if msgs[-1].role != "user":
        raise rec.error(f"prompt must end with a user turn, ends with {msgs[-1].role!r}", "prompt")
    if isinstance(rec, PreferencePair):
        for name in ("chosen", "rejected"):
            v = getattr(rec, name)
            if not isinstance(v, str) or not v.strip():
                raise rec.error("empty or missing response", name)
        if rec.rejected_images is not None and len(rec.rejected_images) != len(rec.images):
            raise rec.error(f"{len(rec.rejected_images)} rejected-side images for "
                            f"{len(rec.images)} prompt images", "rejected_images")
    elif isinstance(rec, RankedList):
        if len(rec.responses) < 2:
            raise rec.error(f"a ranked list needs two or more responses, got {len(rec.responses)}",
                            "responses")
        for i, r in enumerate(rec.responses):
            if not isinstance(r, str) or not r.strip():
                raise rec.error("empty or missing response", f"responses[{i}]")
        if rec.scores is not None and len(rec.scores) != len(rec.responses):
            raise rec.error("scores and responses differ in length", "scores")
    elif isinstance(rec, UnpairedExample):
        if not isinstance(rec.completion, str) or not rec.completion.strip():
            raise rec.error("empty or missing response", "completion")
        if not isinstance(rec.label, bool):
            raise rec.error(f"label must be true or false, got {rec.label!r}", "label")
