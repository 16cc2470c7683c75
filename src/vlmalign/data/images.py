"""Image loading with paths confined to an image root and clear errors on bad files."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .image_modes import to_rgb
from .schema import ImageRef


def resolve_image_path(path: str, root: str | os.PathLike | None) -> Path:
    """Resolve ``path`` under ``root`` and refuse anything that escapes it.

    Relative paths are joined to ``root``; absolute paths must already lie inside it.
    Symlinks are resolved before the check, so a link pointing outside is refused too.
    Without a root, the current directory is the root.
    """
    base = Path(root if root is not None else os.getcwd()).resolve()
    p = Path(path)
    full = (p if p.is_absolute() else base / p).resolve()
    if full != base and base not in full.parents:
        raise DataError(f"image path {path!r} escapes the image root {str(base)!r}", field="image")
    return full


def load_image(ref: ImageRef, root: str | os.PathLike | None = None) -> Image.Image:
    """Open an image as RGB (:func:`.image_modes.to_rgb`: 16-bit grey scaled, transparency on
    white). Raises :class:`DataError` for missing, unreadable or corrupt files."""
    if ref.data is not None:
        try:
            img = Image.open(io.BytesIO(ref.data))
            img.load()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"corrupt image bytes ({e.__class__.__name__}: {e})", field="image") from None
        return to_rgb(img)
    full = resolve_image_path(ref.path, root)
    if not full.exists():
        raise DataError(f"image file not found: {ref.path!r} (looked for {str(full)!r})", field="image")
    if not full.is_file():
        raise DataError(f"image path is not a file: {str(full)!r}", field="image")
    try:
        with Image.open(full) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {str(full)!r} ({e.__class__.__name__}: {e})",
                        field="image") from None
