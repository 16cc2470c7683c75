"""Helpers for the data-layer tests: images drawn with PIL, JSON files, and a comparable
signature of records (images identified by the hash of their bytes)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from PIL import Image

from vlmalign.data.images import resolve_image_path


def png_bytes(color=(255, 0, 0), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def draw(path: Path, color=(255, 0, 0), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color, size))
    return path


def dump(path: Path, obj, lines: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if lines:
        path.write_text("".join(json.dumps(o) + "\n" for o in obj))
    else:
        path.write_text(json.dumps(obj, indent=1))
    return path


def image_id(ref, *roots) -> str:
    """Content identity of an image: sha1 of its bytes (file found under one of ``roots``)."""
    if ref.data is not None:
        return hashlib.sha1(ref.data).hexdigest()[:12]
    for root in roots:
        full = resolve_image_path(ref.path, root)
        if full.exists():
            return hashlib.sha1(full.read_bytes()).hexdigest()[:12]
    raise AssertionError(f"image {ref.path!r} not found under {roots}")


def parts(msgs, *roots):
    return [(m.role, [("text", p.text) if p.type == "text" else ("image", image_id(p.image, *roots))
                      for p in m.content]) for m in msgs]


def signature(rec, *roots, meta: bool = False) -> dict:
    """Everything that must survive a conversion: kind, id, messages/texts, image identities."""
    d = {"kind": rec.kind, "id": rec.id}
    d["messages" if rec.kind == "conversation" else "prompt"] = parts(
        rec.messages if rec.kind == "conversation" else rec.prompt, *roots)
    for k in ("chosen", "rejected", "responses", "scores", "completion", "label", "reference"):
        if hasattr(rec, k):
            d[k] = getattr(rec, k)
    rej = getattr(rec, "rejected_images", None)
    if rej is not None:
        d["rejected_images"] = [image_id(r, *roots) for r in rej]
    if meta:
        d["meta"] = rec.meta
    return d
