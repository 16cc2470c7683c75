"""Where a model's prompts put their images, carried in the model directory.

A model learns the layout of the prompts it was trained on: a question followed by its image
and the image followed by its question are different inputs to it. Training writes
``vlmalign_prompt.json`` next to the weights, counting where the first user turn's images stood
in the training records, and chat / generate read it so that a prompt typed or read later
places its images the way the model saw them::

    {"image_position": "after", "counts": {"before": 0, "after": 240, "inside": 0}}

Positions: ``before`` (images, then the text), ``after`` (the text, then the images),
``inside`` (text on both sides: kept as written, never re-placed).
"""

from __future__ import annotations

import json
import os
from collections import Counter

from ..data.schema import ImagePart, Message, TextPart
from ..errors import ModelError

LAYOUT_FILE = "vlmalign_prompt.json"
POSITIONS = ("before", "after")


def _position(msg: Message) -> str | None:
    kinds = [isinstance(p, ImagePart) for p in msg.content
             if isinstance(p, ImagePart) or (isinstance(p, TextPart) and p.text.strip())]
    if not any(kinds):
        return None
    if all(kinds) or kinds.index(False) == sum(kinds):  # images first (or only images)
        return "before"
    if kinds[::-1].index(False) == sum(kinds):
        return "after"
    return "inside"


def _prompt_messages(rec) -> list[Message]:
    return rec.messages if hasattr(rec, "messages") else rec.prompt


def image_positions(records) -> Counter:
    """How many records place their first user turn's images before, after or inside its text."""
    counts: Counter = Counter()
    for rec in records:
        for m in (_prompt_messages(rec) if rec is not None else ()):
            if m.role == "user" and m.images:
                counts[_position(m)] += 1
                break
    return counts


def detect_layout(records) -> dict | None:
    """The layout of ``records`` (None when none of them shows an image)."""
    counts = image_positions(records)
    if not counts:
        return None
    position = max(("before", "after", "inside"), key=lambda k: counts.get(k, 0))
    return {"image_position": position, "counts": {k: counts.get(k, 0) for k in ("before", "after", "inside")}}


def write_layout(model_dir: str | os.PathLike, layout: dict | None) -> None:
    if layout is not None:
        with open(os.path.join(model_dir, LAYOUT_FILE), "w") as f:
            json.dump(layout, f, indent=1)


def read_layout(model_dir: str | os.PathLike) -> dict | None:
    """The layout a model directory carries (None for one trained elsewhere)."""
    path = os.path.join(os.path.expanduser(str(model_dir)), LAYOUT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            layout = json.load(f)
        position = layout["image_position"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: not a prompt layout ({e}); delete it or rewrite it as "
                         '{"image_position": "before" | "after" | "inside"}') from None
    if position not in (*POSITIONS, "inside"):
        raise ModelError(f"{path}: image_position must be before, after or inside, got {position!r}")
    return layout


def model_image_position(model_dir: str | os.PathLike, default: str = "before") -> str:
    """Where prompts for this model put their images: its layout's ``before``/``after``, else
    ``default`` (also for an ``inside`` layout, which has no single place)."""
    layout = read_layout(model_dir)
    position = layout["image_position"] if layout else default
    return position if position in POSITIONS else default


def place_images(msg: Message, position: str) -> Message:
    """``msg`` with its images moved before or after its text (the order of each kept)."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    images = [p for p in msg.content if isinstance(p, ImagePart)]
    texts = [p for p in msg.content if not isinstance(p, ImagePart)]
    if not images:
        return msg
    return Message(msg.role, images + texts if position == "before" else texts + images)


def replace_images(messages: list[Message], position: str) -> list[Message]:
    """Every user turn of ``messages`` with its images placed at ``position``."""
    return [place_images(m, position) if m.role == "user" else m for m in messages]


def place_records(records, model_dir: str | os.PathLike, choice: str = "data"):
    """``records`` (prompts) with their images placed by ``choice``: ``data`` as the file has them,
    ``model`` as the model directory's layout says, or ``before`` / ``after``. Returns the
    records and a warning (or None) when the file's placement differs from the model's."""
    import dataclasses
    layout = read_layout(model_dir)
    trained = layout["image_position"] if layout else None
    if choice == "model":
        if trained not in POSITIONS:
            raise ModelError(f"{model_dir}: --image-position model needs the model's {LAYOUT_FILE} with "
                             f"image_position before or after (found {trained or 'no layout'})")
        choice = trained
    if choice in POSITIONS:
        return [dataclasses.replace(r, prompt=replace_images(r.prompt, choice)) for r in records], None
    counts = image_positions(records)
    other = sum(n for k, n in counts.items() if k != trained)
    if trained in POSITIONS and other:
        return records, (f"{other} of {sum(counts.values())} prompts do not put their images {trained} the "
                         f"text as the model's training prompts did ({model_dir}/{LAYOUT_FILE}); pass "
                         "--image-position model to follow the model")
    return records, None
