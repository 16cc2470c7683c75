"""Write LLaVA JSON: conversations, ranked lists (last gpt value is the list, best first) and
preference pairs (as two-response ranked lists: read them back with ``kind="preference"``).
Images are explicit ``<image>`` placeholders at their positions."""

from __future__ import annotations

from ..readers import llava as reader
from ..schema import Record
from ._common import Images, add_meta, image_value, text

ROLE_OUT = {"user": "human", "assistant": "gpt", "system": "system"}


def to_obj(rec: Record, images: Images) -> dict:
    ranked = None
    if rec.kind == "conversation":
        msgs = rec.messages
    elif rec.kind == "ranked":
        msgs, ranked = rec.prompt, list(rec.responses)
    elif rec.kind == "preference":
        if rec.rejected_images is not None:
            raise rec.error("llava cannot hold rejected-side images; use vlmalign or trl",
                            "rejected_images")
        msgs, ranked = rec.prompt, [rec.chosen, rec.rejected]
    else:
        raise rec.error(f"llava cannot hold {rec.kind} records (conversation, ranked and "
                        "preference only); use --kind or another format", "kind")
    obj: dict = {}
    if rec.id is not None:
        obj["id"] = rec.id
    paths = [images.path(ref, rec) for m in msgs for ref in m.images]
    if paths:
        obj["image"] = image_value(paths)
    obj["conversations"] = [{"from": ROLE_OUT[m.role],
                             "value": text(m, rec, f"messages[{i}]")} for i, m in enumerate(msgs)]
    if ranked is not None:
        obj["conversations"].append({"from": "gpt", "value": ranked})
        if getattr(rec, "scores", None) is not None:
            obj["scores"] = list(rec.scores)
    return add_meta(obj, rec, "llava", reader.KNOWN)
