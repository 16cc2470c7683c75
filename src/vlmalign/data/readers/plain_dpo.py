"""Resonance ``plain_dpo`` preference format (also RLAIF-V style ``question`` files).

One record::

    {"image": "a.jpg",                       # or a list / comma list, "images", or absent
     "prompt": "Describe the image.",        # or "question"
     "chosen": "A detailed description.",
     "rejected": "A cat.",
     "rejected_image": "a_noisy.jpg"}        # optional, or "rejected_images" (one per image)

The prompt is a single user turn. Resonance writes it without a placeholder (the image is
put in front by its processor), so with no ``<image>`` the images go to the start of the
prompt; with placeholders, each takes its position. Other keys go to ``record.meta``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..placeholders import place_images, split_text
from ..schema import PreferencePair, Record
from ._common import Ctx, id_of, image_list, meta_of, response_of, text_of

KNOWN = {"id", "image", "images", "prompt", "question", "chosen", "rejected",
         "rejected_image", "rejected_images"}


def matches(obj: Mapping) -> bool:
    return ("chosen" in obj and "rejected" in obj and "conversations" not in obj
            and not any(isinstance(obj.get(k), list) for k in ("prompt", "chosen", "rejected")))


def prompt_key(obj: Mapping, ctx: Ctx) -> str:
    if "prompt" in obj and "question" in obj:
        raise ctx.error("both 'prompt' and 'question' are given; use one", "question")
    if "prompt" in obj:
        return "prompt"
    if "question" in obj:
        return "question"
    raise ctx.error("missing field", "prompt")


def parse(obj: Mapping, ctx: Ctx) -> Record:
    pk = prompt_key(obj, ctx)
    text = text_of(obj[pk], ctx, pk)
    images, image_key = image_list(obj, ctx)
    prompt = place_images([("user", split_text(text))], images, lambda r: ctx.error(r, image_key))
    if not prompt[0].content:
        raise ctx.error("empty prompt", pk)
    chosen = response_of(obj.get("chosen"), ctx, "chosen")
    rejected = response_of(obj.get("rejected"), ctx, "rejected")
    rej, rej_key = image_list(obj, ctx, keys=("rejected_image", "rejected_images"))
    has_rej = any(obj.get(k) not in (None, "", []) for k in ("rejected_image", "rejected_images"))
    if has_rej and len(rej) != len(images):
        raise ctx.error(f"{len(rej)} rejected-side images for {len(images)} prompt images", rej_key)
    return PreferencePair(prompt, chosen, rejected, rejected_images=rej if has_rej else None,
                          id=id_of(obj, "id"), meta=meta_of(obj, KNOWN))
