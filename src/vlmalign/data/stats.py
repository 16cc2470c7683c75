"""Dataset statistics: kinds, images per record, turns, response lengths, distinct images.

* turns: user turns per record;
* responses: assistant turns of conversations, chosen and rejected, every ranked response,
  completions and reference answers -- measured in characters (and in tokens when a
  tokenizer is given);
* distinct images: by path (resolved under the image root when one is given) or by the
  hash of the bytes; rejected-side images count too.

``bad_records`` counts the records :func:`vlmalign.data.validate_file` would refuse for
what they hold: those the reader rejects (left out of everything else) and, unless
``check_images=False``, those whose images are missing, corrupt, outside the root or over
the pixel budget (still described: their texts are fine). ``first_problem`` names the first
one. ``duplicate_ids`` counts records whose id an earlier record has;
``unanswered_last_turns`` conversations that end with a user turn without answer;
``one_placeholder_records`` records that wrote one ``<image>`` for several images
(Vision-LLM-Alignment's multi-image layout, expanded by the llava reader: images per record
counts every image). ``max_images`` / ``max_sample_pixels`` make records over those per-sample
caps bad, as in validate.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from ..errors import DataError
from .images import DEFAULT_MAX_PIXELS, resolve_image_path
from .schema import Record, unanswered_end
from .validate import DuplicateIds, check_records


def _responses(rec: Record) -> list[str]:
    if rec.kind == "conversation":
        return [m.text for m in rec.messages if m.role == "assistant"]
    if rec.kind == "preference":
        return [rec.chosen, rec.rejected]
    if rec.kind == "ranked":
        return list(rec.responses)
    if rec.kind == "unpaired":
        return [rec.completion]
    return [rec.reference] if rec.reference else []


def _summary(values: list[float]) -> dict:
    if not values:
        return {"min": None, "mean": None, "max": None}
    return {"min": min(values), "mean": round(sum(values) / len(values), 3), "max": max(values)}


def _image_key(ref, root) -> str:
    if ref.path is not None and root is not None:
        try:
            return "path:" + str(resolve_image_path(ref.path, root))
        except DataError:
            pass
    return ref.key()


def compute_stats(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                  format: str = "auto", kind: str | None = None, tokenizer: Any = None,
                  check_images: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  max_images: int | None = None, max_sample_pixels: int | None = None) -> dict:
    """Statistics of the file at ``path`` as a JSON-ready dict (see the module docstring)."""
    kinds: Counter = Counter()
    n_images, turns, chars, tokens = [], [], [], []
    distinct: set[str] = set()
    bad, first_problem, ids, duplicates, unanswered = set(), None, DuplicateIds(), 0, 0
    one_placeholder = 0
    for index, rec, problems in check_records(path, image_root, format=format, kind=kind,
                                              check_images=check_images, max_pixels=max_pixels,
                                              max_images=max_images,
                                              max_sample_pixels=max_sample_pixels):
        if index is None:
            raise problems[0].error()
        if problems:
            bad.add(index)
            first_problem = first_problem or problems[0].message
        if rec is None:
            continue
        duplicates += ids.earlier(rec) is not None
        unanswered += unanswered_end(rec)
        one_placeholder += bool(rec.one_placeholder_for)
        kinds[rec.kind] += 1
        imgs = list(rec.images) + list(getattr(rec, "rejected_images", None) or [])
        n_images.append(len(rec.images))
        distinct.update(_image_key(r, image_root) for r in imgs)
        msgs = rec.messages if rec.kind == "conversation" else rec.prompt
        turns.append(sum(1 for m in msgs if m.role == "user"))
        for text in _responses(rec):
            chars.append(len(text))
            if tokenizer is not None:
                tokens.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    n = sum(kinds.values())
    out = {
        "file": str(path),
        "records": n,
        "bad_records": len(bad),
        "images_checked": check_images,
        "first_problem": first_problem,
        "duplicate_ids": duplicates,
        "unanswered_last_turns": unanswered,
        "one_placeholder_records": one_placeholder,
        "kinds": dict(sorted(kinds.items())),
        "images_per_record": _summary(n_images),
        "turns": _summary(turns),
        "response_chars": _summary(chars),
        "text_only_share": round(sum(1 for k in n_images if k == 0) / n, 4) if n else None,
        "distinct_images": len(distinct),
    }
    if tokenizer is not None:
        out["response_tokens"] = _summary(tokens)
    return out
