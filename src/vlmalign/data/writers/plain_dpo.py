"""Write Resonance plain_dpo JSON (preference pairs with a single-turn prompt). Images that
lead the prompt are written without a placeholder, as Resonance does; otherwise the prompt
carries ``<image>`` placeholders."""

from __future__ import annotations

from ..placeholders import images_lead
from ..readers import plain_dpo as reader
from ..schema import Record, TextPart
from ._common import Images, add_meta, single_turn_obj, text


def prompt_text(m, rec, field) -> str:
    """The prompt text; no placeholders if every image comes before the text."""
    with_placeholders = text(m, rec, field)
    if images_lead(m.content):
        return "".join(p.text for p in m.content if isinstance(p, TextPart))
    return with_placeholders


def to_obj(rec: Record, images: Images) -> dict:
    if rec.kind != "preference":
        raise rec.error(f"plain_dpo holds preference pairs only, not {rec.kind} records "
                        "(a two-response ranked list can be read with --kind preference)", "kind")
    m, obj = single_turn_obj(rec, images, "plain_dpo")
    obj["prompt"] = prompt_text(m, rec, "prompt")
    obj["chosen"], obj["rejected"] = rec.chosen, rec.rejected
    if rec.rejected_images is not None:
        rej = [images.path(ref, rec, "rejected_images") for ref in rec.rejected_images]
        obj["rejected_images"] = rej
    return add_meta(obj, rec, "plain_dpo", reader.KNOWN)
