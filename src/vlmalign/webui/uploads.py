"""Images for the page: an uploaded file read as bytes (the models' loaders then check it:
decodable, within the pixel budget), and the images under ``--image-root`` to pick from."""

from __future__ import annotations

import os
from pathlib import Path

from ..data.images import load_image
from ..data.schema import ImageRef
from ..errors import VlmalignError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_LISTED = 2000   # images under --image-root offered in the picker


def read_upload(path: str) -> ImageRef:
    """The uploaded file ``path`` (in Gradio's upload folder) as an image given by its bytes."""
    try:
        return ImageRef(data=Path(path).read_bytes())
    except OSError as e:
        raise VlmalignError(f"cannot read the uploaded image ({e.strerror or e})") from None


def list_images(root: str | None) -> list[str]:
    """Image files under ``root``, relative to it, sorted (at most :data:`MAX_LISTED`)."""
    if not root:
        return []
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        found += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files)
                  if f.lower().endswith(IMAGE_SUFFIXES)]
        if len(found) >= MAX_LISTED:
            break
    return found[:MAX_LISTED]


def pick_image(root: str, rel: str, max_pixels: int | None):
    """The image ``rel`` under ``root`` as a PIL image (confined to the root, within the budget)."""
    return load_image(ImageRef(path=rel), root, max_pixels=max_pixels)
