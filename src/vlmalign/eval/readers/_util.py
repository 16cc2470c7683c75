"""Helpers shared by the benchmark readers: located errors, answer checks, image paths."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ...data.images import resolve_image_path
from ...data.schema import ImageRef
from ...errors import DataError
from ..items import EvalItem

POPE_SPLITS = ("random", "popular", "adversarial")


class Loc:
    """A file and record: makes :class:`DataError` values naming file, record and field."""

    def __init__(self, source: str, index: int | None = None):
        self.source = source
        self.index = index

    def at(self, index: int) -> "Loc":
        return Loc(self.source, index)

    def error(self, reason: str, field: str | None = None) -> DataError:
        return DataError(reason, file=self.source, index=self.index, field=field)


def kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null",
            bool: "a boolean", int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and v != v)


def require(obj: dict, key: str, loc: Loc) -> Any:
    if key not in obj:
        raise loc.error(f"missing field (the record has {sorted(obj)[:12]})", key)
    return obj[key]


def question_of(value: Any, loc: Loc, field: str) -> str:
    if not isinstance(value, str):
        raise loc.error(f"question must be a string, got {kind(value)}", field)
    if not value.strip():
        raise loc.error("empty question", field)
    return value


def text_or_none(value: Any) -> str | None:
    return None if blank(value) else str(value)


def yes_no(value: Any, loc: Loc, field: str) -> str:
    """'yes' / 'no' from Yes/No in any case (surrounding blanks ignored)."""
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return value.strip().lower()
    raise loc.error(f"expected a yes/no label (Yes or No), got {value!r}", field)


def check_choice(answer: str | None, options: dict[str, str], loc: Loc, field: str) -> str | None:
    """The answer letter, stripped; an error if it is not one of the options (None passes)."""
    if answer is None:
        return None
    letter = answer.strip()
    if letter not in options:
        raise loc.error(f"answer {answer!r} is not one of the options {sorted(options)}", field)
    return letter


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def decode_b64(value: str, loc: Loc, field: str) -> bytes:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise loc.error(f"bad base64 image data ({e})", field) from None


def path_image(path: Any, root: str | os.PathLike, loc: Loc, field: str) -> ImageRef:
    """An image file under ``root``: confined to it, and it must exist. The reference keeps
    the path as written (relative to the root)."""
    if not isinstance(path, str) or not path.strip():
        raise loc.error(f"expected an image path, got {path!r}", field)
    path = path.strip()
    try:
        full = resolve_image_path(path, root)
    except DataError as e:
        raise loc.error(e.reason, field) from None
    if not full.is_file():
        raise loc.error(f"image file not found: {path!r} (looked for {str(full)!r}; "
                        "pass the folder the images are in as the image root)", field)
    return ImageRef(path=path)


def default_root(path: str | os.PathLike, image_root: str | None) -> str:
    if image_root is not None:
        if not os.path.isdir(image_root):
            raise DataError(f"image root {image_root!r} is not a directory")
        return str(image_root)
    p = Path(path)
    return str(p if p.is_dir() else p.parent)


def finish(items: Iterable[EvalItem], source: str) -> list[EvalItem]:
    """The items, refusing none at all and duplicate ids (naming both records)."""
    items = list(items)
    if not items:
        raise DataError("no items: the benchmark file holds no records", file=source)
    seen: dict[str, EvalItem] = {}
    for it in items:
        first = seen.setdefault(it.id, it)
        if first is not it:
            raise DataError(f"duplicate id {it.id!r} (also {first.where()})", file=it.source,
                            index=it.index, field="id")
    return items


def iter_records(path: str | os.PathLike):
    """``iter_raw`` of the data readers, plus a ``.json`` file holding one JSON object (a
    one-line POPE file, ScienceQA's problems.json) read as that one record."""
    from ...data.readers._containers import _read_text, iter_raw

    try:
        yield from iter_raw(path)
    except DataError as e:
        if "got an object with keys" not in e.reason:
            raise
        import json
        obj = json.loads(_read_text(path))
        yield 0, obj


def json_objects(path: str | os.PathLike):
    """``(index, object, Loc)`` for each record of a JSON / JSONL file, refusing a record that is
    not a JSON object (naming file and record)."""
    src = str(path)
    for i, obj in iter_records(path):
        if isinstance(obj, DataError):
            raise obj
        loc = Loc(src, i)
        if not isinstance(obj, dict):
            raise loc.error(f"expected a JSON object, got {kind(obj)}")
        yield i, obj, loc
