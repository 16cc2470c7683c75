"""PaddleMIX LLaVA format: ``conversations`` is a list of ``[user, assistant]`` pairs.

One record::

    {"image": "a.jpg",
     "conversations": [["<image>\\nWhat animal is shown?", "A dog."],
                       ["Is it indoors?", "No, it is outdoors."]]}

``<image>`` marks the image in a user turn (same rules as LLaVA: no placeholder puts the
images at the start of the first user turn). ``image`` may also be a comma-separated string
or a list. Other top-level keys go to ``record.meta``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..placeholders import Segment, place_images, split_text
from ..schema import Conversation, Record
from ._common import Ctx, id_of, image_list, meta_of, response_of, text_of, type_name, unanswered

KNOWN = {"id", "image", "images", "conversations"}


def matches(obj: Mapping) -> bool:
    conv = obj.get("conversations")
    return isinstance(conv, list) and bool(conv) and isinstance(conv[0], list)


def parse(obj: Mapping, ctx: Ctx) -> Record:
    conv = obj.get("conversations")
    if conv is None:
        raise ctx.error("missing field", "conversations")
    if not isinstance(conv, list) or not conv:
        raise ctx.error("expected a non-empty list of [user, assistant] pairs", "conversations")
    images, image_key = image_list(obj, ctx)
    turns: list[tuple[str, list[Segment]]] = []
    for i, pair in enumerate(conv):
        f = f"conversations[{i}]"
        if not isinstance(pair, list) or len(pair) != 2:
            got = f"{len(pair)} items" if isinstance(pair, list) else type_name(pair)
            raise ctx.error(f"expected a [user, assistant] pair, got {got}", f)
        question = text_of(pair[0], ctx, f"{f}[0]")
        turns.append(("user", split_text(question)))
        if unanswered(pair[1], ctx, last=i == len(conv) - 1):
            continue  # an RL prompt: the last question has no answer
        answer = response_of(pair[1], ctx, f"{f}[1]")
        if "<image>" in answer:
            raise ctx.error("image placeholder in an assistant turn", f"{f}[1]")
        turns.append(("assistant", [answer]))
    messages = place_images(turns, images, lambda r: ctx.error(r, image_key))
    for i in range(0, len(messages), 2):
        if not messages[i].content:
            raise ctx.error("empty user turn", f"conversations[{i // 2}][0]")
    return Conversation(messages, id=id_of(obj, "id"), meta=meta_of(obj, KNOWN))
