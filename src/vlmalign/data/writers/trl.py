"""Write TRL-style datasets: parquet (``OUT.parquet``) or a ``save_to_disk`` directory.

Columns follow TRL's conversational formats, with images embedded as bytes in an ``images``
column of ``Image`` features and ``{"type": "image"}`` parts marking their positions:

* conversation -> ``messages``
* preference   -> ``prompt``, ``chosen``, ``rejected`` (+ ``rejected_images`` if any record has)
* unpaired     -> ``prompt``, ``completion``, ``label``
* rl_prompt    -> ``prompt``, ``reference``

plus ``id`` and one column per meta key. A file holds one record kind; ranked lists have no
TRL form (read them with ``kind="preference"`` when they have two responses).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ...errors import DataError
from ..readers import trl as reader
from ..schema import ImagePart, Message, Record
from ._common import Images, each_record


def _messages(msgs: list[Message]) -> list[dict]:
    return [{"role": m.role,
             "content": [{"type": "image", "text": None} if isinstance(p, ImagePart)
                         else {"type": "text", "text": p.text} for p in m.content]}
            for m in msgs]


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def _image(ref, rec, images: Images, field: str) -> dict:
    return {"bytes": images.data(ref, rec, field), "path": ref.path}


def to_row(rec: Record, images: Images) -> dict:
    row: dict = {}
    if rec.kind == "conversation":
        row["messages"] = _messages(rec.messages)
    elif rec.kind == "ranked":
        raise rec.error("trl has no ranked-list form; read with --kind preference (two "
                        "responses) or write vlmalign/llava", "kind")
    else:
        row["prompt"] = _messages(rec.prompt)
    row["images"] = [_image(r, rec, images, "images") for r in rec.images]
    if rec.kind == "preference":
        row["chosen"], row["rejected"] = _answer(rec.chosen), _answer(rec.rejected)
        if rec.rejected_images is not None:
            row["rejected_images"] = [_image(r, rec, images, "rejected_images")
                                      for r in rec.rejected_images]
    elif rec.kind == "unpaired":
        row["completion"], row["label"] = _answer(rec.completion), rec.label
    elif rec.kind == "rl_prompt":
        row["reference"] = rec.reference
    row["id"] = rec.id
    for k, v in rec.meta.items():
        if k in row or k in reader.KNOWN:
            raise rec.error(f"meta key {k!r} collides with a trl column", f"meta.{k}")
        row[k] = v
    return row


@contextmanager
def _quiet_datasets():
    from datasets.utils import logging as dlog

    was_on = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            dlog.enable_progress_bar()


def write(records: list[Record], out: Path, images: Images,
          skipped: list[DataError] | None = None) -> None:
    """Write ``records`` (``skipped``: see :func:`._common.each_record`)."""
    import datasets

    kinds = sorted({r.kind for r in records})
    if len(kinds) > 1:
        raise DataError(f"a trl dataset holds one record kind, got {', '.join(kinds)}",
                        file=str(out))
    rows = each_record(records, lambda r: to_row(r, images), skipped)
    if any("rejected_images" in r for r in rows):
        for r in rows:
            r.setdefault("rejected_images", None)
    keys = {k for r in rows for k in r}
    for r in rows:  # meta keys present in some records only: null elsewhere
        for k in keys - set(r):
            r[k] = None
    if all(r.get("id") is None for r in rows):
        for r in rows:
            r.pop("id", None)
    with _quiet_datasets():
        try:
            ds = datasets.Dataset.from_list(rows)
        except Exception as e:  # pyarrow cannot unify the types of a meta column
            raise DataError(f"cannot build a table from these records ({e}); meta values of "
                            "one key must have one type", file=str(out)) from None
        image_feature = datasets.List(datasets.Image())
        for col in ("images", "rejected_images"):
            if col in ds.column_names:
                ds = ds.cast_column(col, image_feature)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".parquet":
            ds.to_parquet(str(out))
        else:
            ds.save_to_disk(str(out))
