"""Images in every PIL mode load as RGB with the right pixel values (not PIL's plain
``convert("RGB")``, which clips 16-bit grey to white and drops transparency)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlmalign.data.images import load_image
from vlmalign.data.schema import ImageRef


def encoded(img: Image.Image, fmt: str, **kw) -> ImageRef:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return ImageRef(data=buf.getvalue())


def pixels(ref: ImageRef) -> np.ndarray:
    img = load_image(ref)
    assert img.mode == "RGB"
    return np.asarray(img)[0]  # first row, (width, 3)


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    img = Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16))
    assert img.mode == "I;16"
    path = tmp_path / "scan.png"
    img.save(path)
    with Image.open(path) as back:
        assert back.mode == "I;16"  # the mode PIL reads 16-bit grey PNG files in
    row = np.asarray(load_image(ImageRef(path=path.name), tmp_path))[0]
    assert row[:, 0].tolist() == [0, 1, 128, 255]
    assert (row == row[:, :1]).all()  # grey: R == G == B


@pytest.mark.parametrize("values, expected", [
    ([0, 100, 255], [0, 100, 255]),           # 8-bit values kept as they are
    ([0, 1000, 65535], [0, 4, 255]),          # 16-bit values scaled by 65535
    ([-10, 0, 10], [0, 128, 255]),            # anything else: its own range
])
def test_32_bit_integer_grey(values, expected):
    img = Image.fromarray(np.array([values], dtype=np.int32))
    assert pixels(encoded(img, "TIFF"))[:, 0].tolist() == expected


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.5, 1.0], [0, 128, 255]),         # floats in [0, 1]
    ([0.0, 100.0, 255.0], [0, 100, 255]),     # floats holding 8-bit values
])
def test_float_grey(values, expected):
    img = Image.fromarray(np.array([values], dtype=np.float32))
    assert pixels(encoded(img, "TIFF"))[:, 0].tolist() == expected


def test_transparent_pixels_become_white():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (200, 255))  # opaque grey
    la.putpixel((1, 0), (0, 0))      # fully transparent black
    assert pixels(encoded(la, "PNG")).tolist() == [[200] * 3, [255] * 3]

    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))
    assert pixels(encoded(rgba, "PNG")).tolist() == [[255, 0, 0], [255, 255, 255]]


def test_palette_with_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    ref = encoded(p, "PNG", transparency=0)  # palette index 0 is transparent
    assert pixels(ref).tolist() == [[255, 255, 255], [255, 0, 0]]
    assert pixels(encoded(p, "PNG")).tolist() == [[0, 0, 0], [255, 0, 0]]  # no transparency


def test_cmyk_and_bilevel():
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    assert pixels(encoded(cmyk, "TIFF")).tolist() == [[255, 255, 255], [255, 0, 0]]

    bw = Image.new("1", (2, 1))
    bw.putpixel((1, 0), 1)
    assert pixels(encoded(bw, "PNG")).tolist() == [[0, 0, 0], [255, 255, 255]]


def test_plain_modes_unchanged():
    rgb = Image.new("RGB", (1, 1), (10, 20, 30))
    assert pixels(encoded(rgb, "PNG")).tolist() == [[10, 20, 30]]
    grey = Image.new("L", (1, 1), 77)
    assert pixels(encoded(grey, "PNG")).tolist() == [[77, 77, 77]]
