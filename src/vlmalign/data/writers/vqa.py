"""Write VQA JSON (image, question, answer) from RL prompts with a single user turn."""

from __future__ import annotations

from ..readers import vqa as reader
from ..schema import Record
from ._common import Images, add_meta, single_turn_obj
from .plain_dpo import prompt_text


def to_obj(rec: Record, images: Images) -> dict:
    if rec.kind != "rl_prompt":
        raise rec.error(f"vqa holds rl_prompt records only, not {rec.kind} (convert with "
                        "--kind rl_prompt)", "kind")
    m, obj = single_turn_obj(rec, images, "vqa")
    obj["question"] = prompt_text(m, rec, "prompt")
    if rec.reference is not None:
        obj["answer"] = rec.reference
    return add_meta(obj, rec, "vqa", reader.KNOWN)
