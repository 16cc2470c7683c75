"""Image loading: paths confined to an image root (:func:`resolve_image_path`), a pixel
budget checked from the header before decoding (:data:`DEFAULT_MAX_PIXELS`), every mode as RGB
(:mod:`.image_modes`), and a :class:`DataError` for every bad file -- PIL's own errors and
decompression-bomb warnings never escape. Per sample (all the images one sequence holds):
:func:`check_sample_images`, a cap on the number of images (``max_images``) and on their
pixels together (``max_sample_pixels``), both off by default."""

from __future__ import annotations

import io
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError, VlmalignError
from .image_modes import to_rgb
from .schema import ImageRef

# The default pixel budget: 8192 x 8192 = 67,108,864 pixels (a 192 MiB RGB array once
# decoded). Larger than any image a vision encoder takes whole (they resize to about 336 to
# 1536 pixels a side), so real photos and scans pass; below PIL's own bomb warning
# (MAX_IMAGE_PIXELS, 89,478,485), so a few-KB file declaring 20000 x 20000 pixels is
# refused from its header instead of costing gigabytes of memory per data-loader worker.
DEFAULT_MAX_PIXELS = 8192 * 8192


def check_image_root(root: str | os.PathLike | None) -> None:
    """Refuse, once, a root that does not exist or is not a folder (None: the current folder)."""
    if root is None:
        return
    if not os.path.exists(root):
        raise DataError(f"image root {str(root)!r} does not exist")
    if not os.path.isdir(root):
        raise DataError(f"image root {str(root)!r} is not a directory")


def _inside(p: Path, folder: Path) -> bool:
    return p == folder or folder in p.parents


def _linked_folders(p: Path, root: str | os.PathLike, base: Path) -> list[Path]:
    """Where the folder symlinks on the way from the root to ``p`` point (``p`` normalised
    without following links; none when that leaves the root). A link to the root or to a
    folder above it does not count: it would open everything."""
    p = Path(os.path.normpath(p))
    if p.is_absolute():
        starts = [Path(os.path.abspath(root)), base]
        p = next((p.relative_to(s) for s in starts if _inside(p, s)), Path(os.pardir))
    if p.parts[:1] == (os.pardir,):
        return []
    out, cur = [], base
    for part in p.parts[:-1]:
        cur = cur / part
        if cur.is_symlink():
            target = cur.resolve()
            if not _inside(base, target):
                out.append(target)
    return out


def resolve_image_path(path: str, root: str | os.PathLike | None) -> Path:
    """Resolve ``path`` under ``root`` and refuse anything that escapes it.

    The root is resolved first (it may itself be a symlink); without one, the current folder
    is the root. Relative paths are joined to it; absolute paths must lie inside it. ``..``
    that climbs out is refused. Symlinked folders inside the root (``images ->
    /scratch/coco``, a common cluster layout) are followed: the folder they point to counts
    as inside. Any other link leading out of the root -- a file link such as ``a.png ->
    ~/.ssh/id_rsa``, a link out of a linked folder -- is refused.
    """
    root = root if root is not None else os.getcwd()
    base = Path(os.path.realpath(root))
    p = Path(path)
    full = (p if p.is_absolute() else base / p).resolve()
    if _inside(full, base) or any(_inside(full, f) for f in _linked_folders(p, root, base)):
        return full
    raise DataError(f"image path {path!r} escapes the image root {str(base)!r}", field="image")


def _too_large(name: str, pixels: int | None, size: str | None,
               max_pixels: int | None) -> DataError:
    if max_pixels is not None and (pixels is None or pixels > max_pixels):
        limit = f"the pixel budget of {max_pixels:,} (max_pixels)"
    else:
        limit = f"PIL's limit of {2 * Image.MAX_IMAGE_PIXELS:,} (2 x PIL.Image.MAX_IMAGE_PIXELS)"
    declared = "more pixels" if pixels is None else f"{pixels:,} pixels"
    if size is not None:
        declared = f"{size} = {declared}"
    return DataError(f"image {name} declares {declared}, over {limit}: a decompression bomb or "
                     "too large to train on; resize it or raise the limit", field="image")


@contextmanager
def _pil_guard(name: str, max_pixels: int | None):
    """PIL's decompression-bomb warning silenced, its error (and decoding errors) as DataError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except Image.DecompressionBombError as e:  # PIL refused the header size in open()
            m = re.search(r"\((\d+) pixels\)", str(e))
            raise _too_large(name, int(m[1]) if m else None, None,
                             max_pixels) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
            raise DataError(f"corrupt or unreadable image {name} ({e.__class__.__name__}: {e})",
                            field="image") from None


def _decode(src, name: str, max_pixels: int | None) -> Image.Image:
    with _pil_guard(name, max_pixels), Image.open(src) as img:
        width, height = img.size  # from the header: nothing is decoded yet
        if max_pixels is not None and width * height > max_pixels:
            raise _too_large(name, width * height, f"{width}x{height}", max_pixels)
        img.load()
        return to_rgb(img)


def check_max_pixels(max_pixels: int | None, name: str = "max_pixels",
                     unit: str = "pixels") -> int | None:
    """``max_pixels`` if it is a positive integer or None; else :class:`VlmalignError`
    (``name``/``unit``: the same check for the per-sample limits)."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels <= 0):
        raise VlmalignError(f"{name} must be a positive number of {unit} or None (no "
                            f"limit), got {max_pixels!r}")
    return max_pixels


def _source(ref: ImageRef, root: str | os.PathLike | None):
    """What PIL opens for ``ref`` and the name errors give it (the path confined to ``root``)."""
    if ref.data is not None:
        return io.BytesIO(ref.data), "given as bytes"
    full = resolve_image_path(ref.path, root)
    if not full.exists():
        raise DataError(f"image file not found: {ref.path!r} (looked for {str(full)!r})", field="image")
    if not full.is_file():
        raise DataError(f"image path is not a file: {str(full)!r}", field="image")
    return full, repr(str(full))


def load_image(ref: ImageRef, root: str | os.PathLike | None = None, *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as RGB (:func:`.image_modes.to_rgb`: 16-bit grey scaled, transparency on
    white). Raises :class:`DataError` for missing, unreadable or corrupt files and for images
    whose header declares more than ``max_pixels`` pixels (None: no budget of ours, PIL's own
    limit of ``2 * PIL.Image.MAX_IMAGE_PIXELS`` still holds)."""
    check_max_pixels(max_pixels)
    src, name = _source(ref, root)
    return _decode(src, name, max_pixels)


def image_size(ref: ImageRef, root: str | os.PathLike | None = None, *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the image's header, nothing decoded; the same refusals as
    :func:`load_image` for missing files, paths outside the root and the pixel budget (a
    file whose pixel data is corrupt is only found when it is loaded)."""
    check_max_pixels(max_pixels)
    src, name = _source(ref, root)
    with _pil_guard(name, max_pixels), Image.open(src) as img:
        width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise _too_large(name, width * height, f"{width}x{height}", max_pixels)
    return width, height


def check_sample_images(sizes: list[tuple[int, int]], *, max_images: int | None = None,
                        max_sample_pixels: int | None = None, field: str = "images") -> None:
    """Refuse a sample (the images one sequence holds, ``sizes`` their ``(width, height)`` in
    order) with more than ``max_images`` images or more than ``max_sample_pixels`` pixels
    together, with a :class:`DataError` naming ``field`` and the limit (None: no limit). The
    caller locates the error at its record; nothing is dropped here."""
    check_max_pixels(max_images, "max_images", "images")
    check_max_pixels(max_sample_pixels, "max_sample_pixels", "pixels")
    if max_images is not None and len(sizes) > max_images:
        raise DataError(f"{len(sizes)} images in one sample, over the limit of {max_images} "
                        "(max_images); split the record or raise the limit", field=field)
    total = sum(w * h for w, h in sizes)
    if max_sample_pixels is not None and total > max_sample_pixels:
        shown = " + ".join(f"{w}x{h}" for w, h in sizes[:8]) + (" + ..." if len(sizes) > 8 else "")
        raise DataError(f"the sample's {len(sizes)} images hold {total:,} pixels together "
                        f"({shown}), over the per-sample budget of {max_sample_pixels:,} "
                        "(max_sample_pixels); resize them, split the record or raise the "
                        "limit", field=field)


def image_format(data: bytes) -> str | None:
    """The format name PIL reads in the header of ``data`` (e.g. ``"PNG"``), or None."""
    try:
        with _pil_guard("given as bytes", None), Image.open(io.BytesIO(data)) as img:
            return img.format
    except DataError:
        return None
