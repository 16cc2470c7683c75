"""Dataset statistics: kinds, images per record, turns, response lengths, distinct images.

* turns: user turns per record;
* responses: assistant turns of conversations, chosen and rejected, every ranked response,
  completions and reference answers -- measured in characters (and in tokens when a
  tokenizer is given);
* distinct images: by path (resolved under the image root when one is given) or by the
  hash of the bytes; rejected-side images count too.

Records the reader rejects are counted as ``bad_records`` and otherwise left out.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from ..errors import DataError
from .images import check_image_root, resolve_image_path
from .readers import iter_records
from .schema import Record


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
                  format: str = "auto", kind: str | None = None, tokenizer: Any = None) -> dict:
    """Statistics of the file at ``path`` as a JSON-ready dict (see the module docstring)."""
    check_image_root(image_root)
    kinds: Counter = Counter()
    n_images, turns, chars, tokens = [], [], [], []
    distinct: set[str] = set()
    bad = 0
    for _, rec in iter_records(path, format=format, kind=kind):
        if isinstance(rec, DataError):
            bad += 1
            continue
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
        "bad_records": bad,
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
