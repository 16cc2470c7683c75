"""Hugging Face / TRL column conventions (parquet, ``save_to_disk`` directories, JSON Lines).

Columns, by dataset type (as in TRL's dataset formats guide):

* ``messages`` -> :class:`Conversation`
* ``prompt`` + ``chosen`` + ``rejected`` -> :class:`PreferencePair`; without ``prompt``,
  ``chosen``/``rejected`` are whole conversations and their common prefix is the prompt
  ("implicit prompt"); optional ``rejected_images`` (vlmalign extension, mDPO-style)
* ``prompt`` + ``completion`` + ``label`` -> :class:`UnpairedExample` (KTO)
* ``prompt`` + ``completion`` -> :class:`Conversation`
* ``prompt`` alone -> :class:`RLPrompt`, reference from ``reference``/``solution``/``answer``

Each of prompt/chosen/rejected/completion is either a string (standard) or a list of
``{"role", "content"}`` messages (conversational), where ``content`` is a string or a list
of parts ``{"type": "text", "text": ...}`` / ``{"type": "image"}``. Image parts take the
images of the ``images`` column (or a single ``image`` column) in order; an image part may
also carry its own image (``"image"``/``"path"``). Images are PIL images, ``{"bytes", "path"}``
dicts or path strings; bytes become ``ImageRef(data=...)``. ``<image>`` inside string
content counts as an image part too. If nothing marks where the images go, they are put at
the start of the first user turn. Other columns go to ``record.meta``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..placeholders import Segment, Slot, place_images, split_text
from ..schema import Conversation, Message, PreferencePair, Record, RLPrompt, UnpairedExample
from ._common import (Ctx, id_of, image_list, image_ref, meta_of, response_of, role_of, text_of,
                      type_name)

REFERENCE_KEYS = ("reference", "solution", "answer")
KNOWN = {"id", "images", "image", "messages", "prompt", "chosen", "rejected", "completion",
         "label", "rejected_images", *REFERENCE_KEYS}


def matches(obj: Mapping) -> bool:
    if "messages" in obj or "completion" in obj:
        return True
    if any(isinstance(obj.get(k), list) for k in ("prompt", "chosen", "rejected")):
        return True
    return "prompt" in obj and "chosen" not in obj


Turn = tuple[str, list[Segment]]


def _content(value: Any, ctx: Ctx, field: str, role: str) -> list[Segment]:
    """Segments of one message content: a string or a list of typed parts."""
    if isinstance(value, str):
        if role == "assistant":
            return [value]
        return split_text(value)
    if not isinstance(value, list):
        raise ctx.error(f"content must be a string or a list of parts, got {type_name(value)}",
                        field)
    segs: list[Segment] = []
    for j, part in enumerate(value):
        pf = f"{field}[{j}]"
        if not isinstance(part, Mapping):
            raise ctx.error(f"expected a part object, got {type_name(part)}", pf)
        ptype = part.get("type")
        if ptype == "text":
            text = text_of(part.get("text"), ctx, f"{pf}.text")
            segs.extend([text] if role == "assistant" else split_text(text))
        elif ptype == "image":
            inline = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None),
                          None)
            segs.append(Slot() if inline is None else image_ref(inline, ctx, f"{pf}.image"))
        else:
            raise ctx.error(f"unknown part type {ptype!r} (expected 'text' or 'image')",
                            f"{pf}.type")
    return segs


def _turns(value: Any, ctx: Ctx, field: str) -> list[Turn]:
    """A standard string (one user turn) or a conversational list of messages."""
    if isinstance(value, str):
        return [("user", split_text(value))]
    if not isinstance(value, list) or not value:
        raise ctx.error(f"expected a string or a non-empty list of messages, got "
                        f"{type_name(value)}", field)
    turns = []
    for i, msg in enumerate(value):
        mf = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            raise ctx.error(f"expected a message object, got {type_name(msg)}", mf)
        if "role" not in msg:
            raise ctx.error("missing role", f"{mf}.role")
        role = role_of(msg["role"], ctx, f"{mf}.role")
        if msg.get("content") is None:
            raise ctx.error("missing content", f"{mf}.content")
        turns.append((role, _content(msg["content"], ctx, f"{mf}.content", role)))
    return turns


def _response(value: Any, ctx: Ctx, field: str) -> str:
    """A response column: a string, or a list holding one assistant message."""
    if not isinstance(value, list):
        return response_of(value, ctx, field)
    turns = _turns(value, ctx, field)
    if len(turns) != 1 or turns[0][0] != "assistant":
        raise ctx.error("expected exactly one assistant message", field)
    segs = turns[0][1]
    if any(not isinstance(s, str) for s in segs):
        raise ctx.error("images in a response are not supported", field)
    return response_of("".join(segs), ctx, field)


def _messages(turns: list[Turn], obj: Mapping, ctx: Ctx) -> list[Message]:
    images, key = image_list(obj, ctx, keys=("images", "image"), split_commas=False)
    return place_images(turns, images, lambda r: ctx.error(r, key))


def _implicit_prompt(obj: Mapping, ctx: Ctx) -> tuple[list, Any, Any]:
    chosen, rejected = obj["chosen"], obj["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise ctx.error("missing field (needed unless chosen and rejected are conversations)",
                        "prompt")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ctx.error("chosen and rejected share no prompt messages", "prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def _reference(obj: Mapping, ctx: Ctx) -> str | None:
    """The reference answer of a prompt-only row; several differing candidates are an error."""
    values = {}
    for k in REFERENCE_KEYS:
        v = obj.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if v is not None:
            values[k] = text_of(v, ctx, k)
    if len(set(values.values())) > 1:
        keys = list(values)
        raise ctx.error(f"{' and '.join(keys)} differ; keep one reference answer", keys[1])
    return next(iter(values.values()), None)


def parse(obj: Mapping, ctx: Ctx) -> Record:
    rid = id_of(obj, "id")
    if "messages" in obj:
        turns = _turns(obj["messages"], ctx, "messages")
        return Conversation(_messages(turns, obj, ctx), id=rid, meta=meta_of(obj, KNOWN))
    if "chosen" in obj or "rejected" in obj:
        for k in ("chosen", "rejected"):
            if obj.get(k) is None:
                raise ctx.error("empty or missing response", k)
        if obj.get("prompt") is None:
            prompt_value, chosen_v, rejected_v = _implicit_prompt(obj, ctx)
        else:
            prompt_value, chosen_v, rejected_v = obj["prompt"], obj["chosen"], obj["rejected"]
        prompt = _messages(_turns(prompt_value, ctx, "prompt"), obj, ctx)
        rej = None
        if obj.get("rejected_images") not in (None, []):
            rej, _ = image_list(obj, ctx, keys=("rejected_images",), split_commas=False)
        return PreferencePair(prompt, _response(chosen_v, ctx, "chosen"),
                              _response(rejected_v, ctx, "rejected"), rejected_images=rej,
                              id=rid, meta=meta_of(obj, KNOWN))
    if obj.get("prompt") is None:
        raise ctx.error("no TRL columns found (expected messages, prompt, chosen/rejected or "
                        f"completion; got {sorted(obj)[:10]})", "prompt")
    prompt = _messages(_turns(obj["prompt"], ctx, "prompt"), obj, ctx)
    if "completion" in obj:
        completion = _response(obj["completion"], ctx, "completion")
        if "label" in obj:
            label = obj["label"]
            if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
                label = bool(label)
            if not isinstance(label, bool):
                raise ctx.error(f"label must be true or false, got {label!r}", "label")
            return UnpairedExample(prompt, completion, label, id=rid, meta=meta_of(obj, KNOWN))
        return Conversation(prompt + [Message.assistant(completion)], id=rid,
                            meta=meta_of(obj, KNOWN))
    return RLPrompt(prompt, _reference(obj, ctx), id=rid, meta=meta_of(obj, KNOWN))
