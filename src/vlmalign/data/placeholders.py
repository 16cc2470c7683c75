"""The ``<image>`` placeholder convention of text-based formats (LLaVA, plain DPO, VQA).

Reading: a text is split at each ``<image>``; one newline directly before and one directly
after a placeholder belong to the placeholder (``"<image>\\nWhat?"`` is an image followed by
``"What?"``). Writing reverses it: a newline is put between an image and adjacent text unless
that text already meets the image with a space, so ``split(join(parts)) == parts`` for every
list of parts without empty texts.

Placing images: when a record has images but no placeholder anywhere, the LLaVA convention
puts them at the start of the first user turn; when it has placeholders, their number must
equal the number of images. One exception, applied only where a reader knows the layout
(:func:`expand_one_placeholder`): Vision-LLM-Alignment's multi-image SFT files write a single
``<image>`` for all the images of a record (``"image": "a.jpg,b.jpg"``); that placeholder
stands for the images in order, one after the other at its position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from ..errors import DataError
from .schema import ImagePart, ImageRef, Message, Part, TextPart

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Slot:
    """An image position in a turn whose image comes from the record's image list."""


Segment = Union[str, Slot, ImageRef]  # text, a slot to fill, or an image given inline


def split_text(text: str) -> list[Segment]:
    """Split text at ``<image>`` into text segments and :class:`Slot` markers."""
    pieces = text.split(IMAGE_TOKEN)
    out: list[Segment] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            out.append(Slot())
            if piece.startswith("\n"):
                piece = piece[1:]
        if i < len(pieces) - 1 and piece.endswith("\n"):
            piece = piece[:-1]
        if piece:
            out.append(piece)
    return out


def join_parts(parts: list[Part]) -> str:
    """Inverse of :func:`split_text` for schema parts: images become ``<image>``."""
    out = ""
    prev_image = False
    for p in parts:
        if isinstance(p, ImagePart):
            if out and not out.endswith(" "):
                out += "\n"
            out += IMAGE_TOKEN
            prev_image = True
        else:
            if not p.text:
                continue
            if prev_image and not p.text.startswith(" "):
                out += "\n"
            out += p.text
            prev_image = False
    return out


def images_lead(parts: list[Part]) -> bool:
    """True if every image of ``parts`` comes before every text (no placeholder needed)."""
    seen_text = False
    for p in parts:
        if isinstance(p, TextPart):
            seen_text = True
        elif seen_text:
            return False
    return True


def count_slots(turns: list[tuple[str, list[Segment]]]) -> int:
    return sum(1 for _, segs in turns for s in segs if isinstance(s, Slot))


def expand_one_placeholder(turns: list[tuple[str, list[Segment]]], n_images: int
                           ) -> tuple[list[tuple[str, list[Segment]]], int | None]:
    """The one-placeholder convention: a record with exactly one ``<image>`` slot and
    ``n_images`` > 1 images gets ``n_images`` slots at that position (the images in order).

    Returns the turns and the number of images the placeholder stood for (None: the turns
    unchanged, because the record does not have exactly one slot and several images -- any
    other mismatch stays an error of :func:`place_images`).
    """
    if n_images < 2 or count_slots(turns) != 1:
        return turns, None
    out = []
    for role, segs in turns:
        new: list[Segment] = []
        for s in segs:
            new.extend([Slot()] * n_images if isinstance(s, Slot) else [s])
        out.append((role, new))
    return out, n_images


def place_images(turns: list[tuple[str, list[Segment]]], images: list[ImageRef],
                 error: Callable[[str], DataError]) -> list[Message]:
    """Build messages from ``(role, segments)`` turns, filling slots with ``images`` in order.

    No slot but images: the images go to the start of the first user turn. Otherwise the
    number of slots must equal the number of images; ``error(reason)`` makes the exception.
    """
    n_slots = count_slots(turns)
    if n_slots == 0 and images:
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            raise error(f"{len(images)} image(s) but no user turn to put them in")
        role, segs = turns[first_user]
        turns = list(turns)
        turns[first_user] = (role, [Slot()] * len(images) + list(segs))
    elif n_slots != len(images):
        raise error(f"placeholder count {n_slots} differs from image count {len(images)}")
    it = iter(images)
    messages = []
    for role, segs in turns:
        parts: list[Part] = []
        for s in segs:
            if isinstance(s, Slot):
                parts.append(ImagePart(next(it)))
            elif isinstance(s, ImageRef):
                parts.append(ImagePart(s))
            elif s and parts and isinstance(parts[-1], TextPart):
                parts[-1] = TextPart(parts[-1].text + s)  # adjacent texts become one part
            elif s:
                parts.append(TextPart(s))
        messages.append(Message(role, parts))
    return messages
