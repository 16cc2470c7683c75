"""Any PIL image mode -> 8-bit RGB with the pixel values the file means.

PIL's ``convert("RGB")`` is right for 8-bit modes (L, P, CMYK, YCbCr, 1, ...) but not for:

* 16-bit grey (``I;16``, what PIL opens 16-bit grey PNG and TIFF files as): values are
  clipped at 255, so a scan trains as an almost white image. They are scaled by the bit
  depth instead: ``v * 255 / 65535``.
* 32-bit integer and float grey (``I``, ``F``): no bit depth is recorded, so the scale comes
  from the values: floats within [0, 1] are fractions of white; values within [0, 255] are
  8-bit; within [0, 65535] 16-bit; anything else (negative values, larger ranges) is
  stretched from its minimum to its maximum.
* transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent palette entry): the
  alpha channel is dropped and transparent pixels show whatever colour they hold, often
  black. They are composited on white instead (as Hugging Face image processors do).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as a new 8-bit RGB image (see the module docstring)."""
    if img.mode in SIXTEEN_BIT or img.mode in ("I", "F"):
        return _grey_to_rgb(img)
    if img.mode in ALPHA or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _value_range(a: np.ndarray, mode: str) -> tuple[float, float]:
    """(value shown as black, value shown as white)."""
    if mode in SIXTEEN_BIT:
        return 0.0, 65535.0
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0:
        if mode == "F" and hi <= 1.0:
            return 0.0, 1.0
        for full in (255.0, 65535.0):
            if hi <= full:
                return 0.0, full
    return lo, hi if hi > lo else lo + 1.0


def _grey_to_rgb(img: Image.Image) -> Image.Image:
    a = np.nan_to_num(np.asarray(img, dtype=np.float64))
    black, white = _value_range(a, img.mode)
    grey = np.clip(np.rint((a - black) * (255.0 / (white - black))), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")  # uint8 2-D: mode L
