"""LLaVA conversation format (also Resonance ``vlquery_json``, and Vision-LLM-Alignment's
ranked variant for reward-model / DPO data).

One record::

    {"id": "a1",
     "image": "a.jpg" | "a.jpg,b.jpg" | ["a.jpg", "b.jpg"] | absent,   # or "images"
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

* roles: ``human``/``user``, ``gpt``/``assistant``, ``system`` (case-insensitive);
  ``role``/``content`` keys are accepted in place of ``from``/``value``.
* ``<image>`` may appear anywhere in a user turn; images take those positions in order.
  Images without any placeholder go to the start of the first user turn (LLaVA convention);
  otherwise the placeholder count must equal the image count -- with one exception, the
  layout of Vision-LLM-Alignment's multi-image SFT file (``sft_samples_multi_image.json``,
  made for Llama-3.2-Vision): ``"image"`` is a comma-separated string of several paths and
  the record has exactly one ``<image>``, which stands for all of them, in order. That
  placeholder becomes one image part per image at its position, and the record says so
  (``record.one_placeholder_for`` = the image count; ``data validate`` and ``data stats``
  count such records, training logs the count). Anything else (two placeholders for three
  images, one placeholder for a JSON list of images) is still refused.
* Ranked variant: the last ``gpt`` value is a list of responses, best first ->
  :class:`RankedList` (optional top-level ``"scores"`` list, one per response).
* Other top-level keys go to ``record.meta``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..placeholders import Segment, expand_one_placeholder, place_images, split_text
from ..schema import Conversation, RankedList, Record
from ._common import (Ctx, id_of, image_list, meta_of, response_of, role_of, text_of, type_name,
                      unanswered)

KNOWN = {"id", "image", "images", "conversations"}


def matches(obj: Mapping) -> bool:
    conv = obj.get("conversations")
    return isinstance(conv, list) and (not conv or isinstance(conv[0], Mapping))


def _turn_keys(turn: Mapping) -> tuple[str, str]:
    if "from" in turn or "value" in turn:
        return "from", "value"
    if "role" in turn or "content" in turn:
        return "role", "content"
    return "from", "value"


def parse(obj: Mapping, ctx: Ctx) -> Record:
    conv = obj.get("conversations")
    if conv is None:
        raise ctx.error("missing field", "conversations")
    if not isinstance(conv, list):
        raise ctx.error(f"expected a list of turns, got {type_name(conv)}", "conversations")
    if not conv:
        raise ctx.error("empty conversation", "conversations")
    images, image_key = image_list(obj, ctx)

    turns: list[tuple[str, list[Segment]]] = []
    ranked: list[str] | None = None
    for i, turn in enumerate(conv):
        f = f"conversations[{i}]"
        if not isinstance(turn, Mapping):
            raise ctx.error(f"expected an object with 'from' and 'value', got {type_name(turn)}", f)
        rk, vk = _turn_keys(turn)
        if rk not in turn:
            raise ctx.error("missing role", f"{f}.{rk}")
        role = role_of(turn[rk], ctx, f"{f}.{rk}")
        value = turn.get(vk)
        if role == "assistant":
            if unanswered(value, ctx, last=i == len(conv) - 1):
                continue  # an RL prompt file's empty answer: the user turn is the prompt
            if isinstance(value, list):
                if i != len(conv) - 1:
                    raise ctx.error("only the last gpt turn may hold a list of ranked responses",
                                    f"{f}.{vk}")
                ranked = [response_of(v, ctx, f"{f}.{vk}[{j}]") for j, v in enumerate(value)]
                continue
            text = response_of(value, ctx, f"{f}.{vk}")
            if "<image>" in text:
                raise ctx.error("image placeholder in a gpt turn", f"{f}.{vk}")
            turns.append((role, [text]))
        else:
            if value is None:
                raise ctx.error("missing text", f"{f}.{vk}")
            turns.append((role, split_text(text_of(value, ctx, f"{f}.{vk}"))))

    one_for = None
    if isinstance(obj.get(image_key), str):  # "a.jpg,b.jpg": the layout that writes one <image>
        turns, one_for = expand_one_placeholder(turns, len(images))
    messages = place_images(turns, images, lambda r: ctx.error(r, image_key))
    for i, m in enumerate(messages):
        if not m.content:
            raise ctx.error("empty turn", f"conversations[{i}]")
    rid = id_of(obj, "id")
    if ranked is None:
        return Conversation(messages, id=rid, meta=meta_of(obj, KNOWN), one_placeholder_for=one_for)
    scores = obj.get("scores")
    if scores is not None and (not isinstance(scores, list) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
        raise ctx.error("expected a list of numbers", "scores")
    return RankedList(messages, ranked, scores=[float(s) for s in scores] if scores else None,
                      id=rid, meta=meta_of(obj, KNOWN | {"scores"}), one_placeholder_for=one_for)
