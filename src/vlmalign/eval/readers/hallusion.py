"""HallusionBench's own ``HallusionBench.json`` (tianyi-lab/HallusionBench)."""

from __future__ import annotations

from ..items import EvalItem
from ._util import blank, default_root, json_objects, path_image, question_of, require

KEYS = ("category", "subcategory", "set_id", "figure_id", "question_id", "visual_input")


def read_hallusionbench(path: str, image_root: str | None) -> tuple[list[EvalItem], str]:
    """One item per record; ``filename`` ("./hallusion_bench/VD/...png") is relative to the
    folder of HallusionBench.json unless an image root is given; no image when visual_input is
    0. The id joins category, subcategory, set_id, figure_id and question_id, the key the
    official evaluation uses (question_id alone repeats across figures and sets)."""
    src, root = str(path), default_root(path, image_root)
    items = []
    for i, obj, loc in json_objects(path):
        meta = {k: str(require(obj, k, loc)) for k in KEYS}
        gt = str(require(obj, "gt_answer", loc)).strip()
        if gt not in ("0", "1"):
            raise loc.error(f"gt_answer must be 1 (yes) or 0 (no), got {obj['gt_answer']!r}",
                            "gt_answer")
        images = []
        if meta["visual_input"] != "0":
            if blank(obj.get("filename")):
                raise loc.error(f"visual_input is {meta['visual_input']} but no filename",
                                "filename")
            images = [path_image(obj["filename"], root, loc, "filename")]
        for k in ("gt_answer_details", "sample_note", "filename"):
            if not blank(obj.get(k)):
                meta[k] = obj[k]
        items.append(EvalItem(
            id="_".join(meta[k] for k in KEYS[:5]),
            question=question_of(require(obj, "question", loc), loc, "question"),
            images=images, answer="yes" if gt == "1" else "no",
            category=meta["category"], source=src, index=i, meta=meta))
    return items, root
