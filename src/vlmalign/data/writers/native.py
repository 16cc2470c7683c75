"""Write vlmalign's native JSON Lines (see :mod:`vlmalign.data.readers.native`): lossless."""

from __future__ import annotations

from ..schema import ImagePart, Message, Record
from ._common import Images


def _messages(msgs: list[Message], rec: Record, images: Images, field: str) -> list[dict]:
    out = []
    for i, m in enumerate(msgs):
        parts = []
        for p in m.content:
            if isinstance(p, ImagePart):
                parts.append({"type": "image",
                              "image": images.path(p.image, rec, f"{field}[{i}].content")})
            else:
                parts.append({"type": "text", "text": p.text})
        out.append({"role": m.role, "content": parts})
    return out


def to_obj(rec: Record, images: Images) -> dict:
    obj: dict = {"kind": rec.kind}
    if rec.id is not None:
        obj["id"] = rec.id
    if rec.kind == "conversation":
        obj["messages"] = _messages(rec.messages, rec, images, "messages")
    else:
        obj["prompt"] = _messages(rec.prompt, rec, images, "prompt")
    if rec.kind == "preference":
        obj["chosen"], obj["rejected"] = rec.chosen, rec.rejected
        if rec.rejected_images is not None:
            obj["rejected_images"] = [images.path(r, rec, "rejected_images")
                                      for r in rec.rejected_images]
    elif rec.kind == "ranked":
        obj["responses"] = list(rec.responses)
        if rec.scores is not None:
            obj["scores"] = list(rec.scores)
    elif rec.kind == "unpaired":
        obj["completion"], obj["label"] = rec.completion, rec.label
    elif rec.kind == "rl_prompt" and rec.reference is not None:
        obj["reference"] = rec.reference
    if rec.meta:
        obj["meta"] = dict(rec.meta)
    return obj
