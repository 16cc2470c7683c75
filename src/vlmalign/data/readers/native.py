"""vlmalign's own format: JSON Lines that serialize the schema exactly (lossless).

One object per line; ``kind`` selects the record type::

    {"kind": "conversation", "id": "a1", "meta": {...},
     "messages": [{"role": "user", "content": [{"type": "image", "image": "a.jpg"},
                                               {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}
    {"kind": "preference", "prompt": [...], "chosen": "...", "rejected": "...",
     "rejected_images": ["b.jpg"]}                       # rejected_images optional
    {"kind": "ranked", "prompt": [...], "responses": ["best", "worse"], "scores": [2.0, 1.0]}
    {"kind": "unpaired", "prompt": [...], "completion": "...", "label": true}
    {"kind": "rl_prompt", "prompt": [...], "reference": "cat"}

Roles are exactly ``system``/``user``/``assistant``; images are paths (relative to the image
root). Unknown fields are errors, so typos do not pass silently. ``id`` and ``meta`` are
optional everywhere. A ``.json`` list of such objects is read too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..schema import (ROLES, Conversation, ImagePart, ImageRef, Message, PreferencePair,
                      RankedList, Record, RLPrompt, TextPart, UnpairedExample, RECORD_KINDS)
from ._common import Ctx, response_of, text_of, type_name

FIELDS = {
    "conversation": {"messages"},
    "preference": {"prompt", "chosen", "rejected", "rejected_images"},
    "ranked": {"prompt", "responses", "scores"},
    "unpaired": {"prompt", "completion", "label"},
    "rl_prompt": {"prompt", "reference"},
}
COMMON = {"kind", "id", "meta"}


def matches(obj: Mapping) -> bool:
    return obj.get("kind") in RECORD_KINDS


def _image(value: Any, ctx: Ctx, field: str) -> ImageRef:
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(f"image must be a non-empty path string, got {type_name(value)}", field)
    return ImageRef(path=value)


def _messages(value: Any, ctx: Ctx, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise ctx.error(f"expected a non-empty list of messages, got {type_name(value)}", field)
    out = []
    for i, m in enumerate(value):
        mf = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise ctx.error(f"expected a message object, got {type_name(m)}", mf)
        extra = set(m) - {"role", "content"}
        if extra:
            raise ctx.error(f"unknown field(s) {sorted(extra)}", mf)
        role = m.get("role")
        if role not in ROLES:
            raise ctx.error(f"unknown role {role!r} (expected one of {', '.join(ROLES)})",
                            f"{mf}.role")
        content = m.get("content")
        if not isinstance(content, list):
            raise ctx.error(f"content must be a list of parts, got {type_name(content)}",
                            f"{mf}.content")
        parts = []
        for j, p in enumerate(content):
            pf = f"{mf}.content[{j}]"
            ptype = p.get("type") if isinstance(p, Mapping) else None
            if ptype == "text" and set(p) == {"type", "text"}:
                parts.append(TextPart(text_of(p["text"], ctx, f"{pf}.text")))
            elif ptype == "image" and set(p) == {"type", "image"}:
                parts.append(ImagePart(_image(p["image"], ctx, f"{pf}.image")))
            else:
                raise ctx.error('expected {"type": "text", "text": ...} or '
                                '{"type": "image", "image": PATH}', pf)
        out.append(Message(role, parts))
    return out


def parse(obj: Mapping, ctx: Ctx) -> Record:
    kind = obj.get("kind")
    if kind not in RECORD_KINDS:
        raise ctx.error(f"unknown kind {kind!r} (expected one of {', '.join(RECORD_KINDS)})",
                        "kind")
    extra = set(obj) - COMMON - FIELDS[kind]
    if extra:
        raise ctx.error(f"unknown field(s) {sorted(extra)} for kind {kind!r}", sorted(extra)[0])
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ctx.error(f"id must be a string, got {type_name(rid)}", "id")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise ctx.error(f"meta must be an object, got {type_name(meta)}", "meta")
    common = dict(id=rid, meta=dict(meta))
    if kind == "conversation":
        return Conversation(_messages(obj.get("messages"), ctx, "messages"), **common)
    prompt = _messages(obj.get("prompt"), ctx, "prompt")
    if kind == "preference":
        rej = obj.get("rejected_images")
        if rej is not None:
            if not isinstance(rej, list):
                raise ctx.error(f"expected a list of paths, got {type_name(rej)}",
                                "rejected_images")
            rej = [_image(v, ctx, f"rejected_images[{i}]") for i, v in enumerate(rej)]
        return PreferencePair(prompt, response_of(obj.get("chosen"), ctx, "chosen"),
                              response_of(obj.get("rejected"), ctx, "rejected"),
                              rejected_images=rej, **common)
    if kind == "ranked":
        responses = obj.get("responses")
        if not isinstance(responses, list):
            raise ctx.error(f"expected a list of responses, got {type_name(responses)}",
                            "responses")
        scores = obj.get("scores")
        if scores is not None and (not isinstance(scores, list) or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
            raise ctx.error("expected a list of numbers", "scores")
        return RankedList(prompt, [response_of(r, ctx, f"responses[{i}]")
                                   for i, r in enumerate(responses)],
                          scores=[float(s) for s in scores] if scores is not None else None,
                          **common)
    if kind == "unpaired":
        label = obj.get("label")
        if not isinstance(label, bool):
            raise ctx.error(f"label must be true or false, got {label!r}", "label")
        return UnpairedExample(prompt, response_of(obj.get("completion"), ctx, "completion"),
                               label, **common)
    ref = obj.get("reference")
    return RLPrompt(prompt, None if ref is None else text_of(ref, ctx, "reference"), **common)
