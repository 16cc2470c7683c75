"""Shared writer helpers: image paths/bytes, ``<image>`` text, meta keys, JSON output."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ...errors import DataError
from ..images import image_format, resolve_image_path
from ..placeholders import IMAGE_TOKEN, join_parts
from ..schema import ImageRef, Message, Record


class Images:
    """Turns :class:`ImageRef` values into what a format stores.

    Path formats keep paths as they are (still relative to the same image root); bytes are
    written once to ``image_dir`` as ``<sha1>.<ext>`` and referenced relative to the output
    file's folder (``images/<sha1>.png``). Without ``image_dir``, bytes are an error.
    Byte formats (parquet) read path images from ``image_root``.
    """

    def __init__(self, out: Path, image_dir: str | os.PathLike | None = None,
                 image_root: str | os.PathLike | None = None):
        self.base = out.parent
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.image_root = image_root

    def path(self, ref: ImageRef, rec: Record, field: str = "image") -> str:
        if ref.path is not None:
            return ref.path
        if self.image_dir is None:
            raise rec.error("an image given as bytes needs an image directory to be written to "
                            "a path-based format (use `vlmalign data convert`)", field)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1(ref.data).hexdigest() + _extension(ref.data)
        target = self.image_dir / name
        if not target.exists():
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(ref.data)
            os.replace(tmp, target)
        return Path(os.path.relpath(target, self.base)).as_posix()

    def data(self, ref: ImageRef, rec: Record, field: str = "images") -> bytes:
        if ref.data is not None:
            return ref.data
        try:
            full = resolve_image_path(ref.path, self.image_root)
        except DataError as e:
            raise rec.error(e.reason, field) from None
        where = "" if self.image_root is not None else (
            "; no image root was given: paths are read from the current folder")
        if not full.is_file():
            raise rec.error(f"image file not found: {ref.path!r} (looked for {str(full)!r})"
                            + where, field)
        try:
            return full.read_bytes()
        except OSError as e:
            raise rec.error(f"cannot read image {str(full)!r} ({e.strerror})", field) from None


def each_record(records: Iterable[Record], convert: Callable[[Record], dict],
                skipped: list[DataError] | None) -> list[dict]:
    """``convert(record)`` for every record. A record it refuses raises -- or, given a
    ``skipped`` list, is appended to it and left out."""
    out = []
    for rec in records:
        try:
            out.append(convert(rec))
        except DataError as e:
            if skipped is None:
                raise
            skipped.append(e)
    return out


def refuse_overwrite(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output that is one of the ``inputs`` (same file or folder, by any path)."""
    if not os.path.exists(out):
        return
    for src in inputs:
        if os.path.exists(src) and os.path.samefile(out, src):
            raise DataError(f"the output {str(out)!r} is the input {str(src)!r}: writing it "
                            "would destroy the input; write to another path", file=str(src))


def _extension(data: bytes) -> str:
    # undecodable bytes are still written (as .bin), so validate can report them
    fmt = (image_format(data) or "").lower()
    return {"jpeg": ".jpg", "": ".bin"}.get(fmt, "." + fmt)


def text(m: Message, rec: Record, field: str) -> str:
    """Message text with ``<image>`` placeholders; refuse texts that contain one literally."""
    for p in m.content:
        if getattr(p, "text", None) and IMAGE_TOKEN in p.text:
            raise rec.error(f"text contains a literal {IMAGE_TOKEN!r}, which this format would "
                            "read as an image", field)
    return join_parts(m.content)


def single_user_turn(prompt: list[Message], rec: Record, fmt: str) -> Message:
    if len(prompt) != 1 or prompt[0].role != "user":
        roles = [m.role for m in prompt]
        raise rec.error(f"{fmt} holds a prompt of exactly one user turn, this one has {roles}",
                        "prompt")
    return prompt[0]


def single_turn_obj(rec: Record, images: Images, fmt: str) -> tuple[Message, dict]:
    """The one user turn of a single-turn format's record, and the object begun with its
    ``id`` and ``image`` fields."""
    m = single_user_turn(rec.prompt, rec, fmt)
    obj: dict = {}
    if rec.id is not None:
        obj["id"] = rec.id
    paths = [images.path(ref, rec) for ref in m.images]
    if paths:
        obj["image"] = image_value(paths)
    return m, obj


def image_value(paths: list[str]):
    """One path as a string, several as a list (never comma-joined: paths may hold commas)."""
    return paths[0] if len(paths) == 1 else paths


def add_meta(obj: dict, rec: Record, fmt: str, reserved: set[str] = frozenset()) -> dict:
    """Meta keys become top-level fields (as the readers put unknown fields into meta)."""
    for k, v in rec.meta.items():
        if k in obj or k in reserved:
            raise rec.error(f"meta key {k!r} collides with a {fmt} field", f"meta.{k}")
        obj[k] = v
    return obj


def write_json(objs: list[dict], out: Path, lines: bool) -> None:
    """Write a JSON list (``lines=False``) or JSON Lines, atomically (temp file + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if lines:
            for o in objs:
                f.write(json.dumps(o, ensure_ascii=False) + "\n")
        else:
            json.dump(objs, f, ensure_ascii=False, indent=2)
            f.write("\n")
    os.replace(tmp, out)
