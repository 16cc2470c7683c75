"""Helpers shared by the format readers: located errors, roles, image values, responses."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

from ...errors import DataError
from ..schema import ImageRef

# Role names accepted in the files (case-insensitive) -> schema role.
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


class Ctx:
    """Where a record comes from; makes :class:`DataError` values that name file, record, field.

    ``kind``: the kind the record is read as (None: its own), for the readers' one
    kind-dependent rule, :func:`unanswered`.
    """

    def __init__(self, source: str, index: int | None, kind: str | None = None):
        self.source = source
        self.index = index
        self.kind = kind

    def error(self, reason: str, field: str | None = None) -> DataError:
        return DataError(reason, file=self.source, index=self.index, field=field)

    def stamp(self, rec):
        rec.source = self.source
        rec.index = self.index
        return rec


def type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null",
            bool: "a boolean", int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def role_of(value: Any, ctx: Ctx, field: str) -> str:
    if not isinstance(value, str):
        raise ctx.error(f"role must be a string, got {type_name(value)}", field)
    role = ROLE_ALIASES.get(value.strip().lower())
    if role is None:
        raise ctx.error(f"unknown role {value!r} (expected one of human, gpt, user, assistant, "
                        "system)", field)
    return role


def text_of(value: Any, ctx: Ctx, field: str) -> str:
    """A required string (may be empty: user turns that are only an image)."""
    if not isinstance(value, str):
        raise ctx.error(f"expected a string, got {type_name(value)}", field)
    return value


def response_of(value: Any, ctx: Ctx, field: str) -> str:
    """A model response: a non-empty string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ctx.error("empty or missing response", field)
    if not isinstance(value, str):
        raise ctx.error(f"response must be a string, got {type_name(value)}", field)
    return value


def unanswered(value: Any, ctx: Ctx, last: bool) -> bool:
    """True for an empty answer in the last turn of a conversation read as ``rl_prompt``:
    RL prompt files (Vision-LLM-Alignment PPO data) leave it empty; the turn before is the
    prompt. Other kinds still refuse it ("empty or missing response")."""
    empty = value is None or (isinstance(value, str) and not value.strip())
    return last and empty and ctx.kind == "rl_prompt"


def id_of(obj: Mapping, *keys: str) -> str | None:
    for k in keys:
        v = obj.get(k)
        if v is not None and v != "":
            return str(v)
    return None


def image_ref(value: Any, ctx: Ctx, field: str) -> ImageRef:
    """One image value: a path string, ``{"bytes": ..., "path": ...}``, raw bytes or a PIL image."""
    if isinstance(value, str):
        if not value.strip():
            raise ctx.error("empty image path", field)
        return ImageRef(path=value.strip())
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value))
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            if not isinstance(data, (bytes, bytearray)):
                raise ctx.error(f"image 'bytes' must be binary, got {type_name(data)}", field)
            return ImageRef(data=bytes(data))
        if isinstance(path, str) and path.strip():
            return ImageRef(path=path.strip())
        raise ctx.error("image object has neither 'bytes' nor 'path'", field)
    if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image decoded by `datasets`
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return ImageRef(data=buf.getvalue())
    raise ctx.error(f"expected an image path, got {type_name(value)}", field)


def image_list(obj: Mapping, ctx: Ctx, keys: tuple[str, ...] = ("image", "images"),
               split_commas: bool = True) -> tuple[list[ImageRef], str]:
    """The images of a record from the first present key of ``keys`` (two present: an error).

    A string may list several paths separated by commas (LLaVA multi-image convention);
    a list holds one image value per entry; null, "" and [] mean no image.
    Returns the images and the key they came from (for error messages).
    """
    present = [k for k in keys if obj.get(k) not in (None, "", [])]
    if len(present) > 1:
        raise ctx.error(f"both {present[0]!r} and {present[1]!r} are given; use one", present[1])
    if not present:
        return [], keys[0]
    key = present[0]
    value = obj[key]
    if isinstance(value, str):
        items = [s for s in value.split(",")] if split_commas else [value]
        if any(not s.strip() for s in items):
            raise ctx.error(f"empty path in image list {value!r}", key)
        return [ImageRef(path=s.strip()) for s in items], key
    if isinstance(value, list):
        out = []
        for i, v in enumerate(value):
            if v is None:
                raise ctx.error("null image", f"{key}[{i}]")
            out.append(image_ref(v, ctx, f"{key}[{i}]"))
        return out, key
    return [image_ref(value, ctx, key)], key


def meta_of(obj: Mapping, known: set[str]) -> dict:
    """Extra fields of a record (not used by the reader), kept for evaluation and filtering.

    Null values (absent cells of a column) and values that cannot be written as JSON
    (bytes, images) are left out.
    """
    meta = {}
    for k, v in obj.items():
        if k in known or v is None:
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        meta[k] = v
    return meta
