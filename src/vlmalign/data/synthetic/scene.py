"""Scenes (ground truth) and their rendering.

A :class:`Scene` is a list of :class:`ShapeObject` values, one per occupied grid cell, each
with a colour, a shape, its cell name and its pixel bounding box. :func:`sample_scene` draws one
from a ``numpy.random.Generator``; :func:`render` draws it with PIL without anti-aliasing, so
every object pixel has exactly the palette value of its colour and the image is a pure function
of the scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .config import COLOURS, ShapesConfig, cell_names


@dataclass(frozen=True)
class ShapeObject:
    """One object. ``bbox`` is ``(left, top, right, bottom)`` in pixels of the scene's
    ``image_size``, right/bottom exclusive (like ``PIL.Image.crop``)."""

    colour: str
    shape: str
    cell: str
    bbox: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[int, int]:
        """A pixel ``(x, y)`` inside the drawn shape (for every shape kind)."""
        l, t, r, b = self.bbox
        return ((l + r - 1) // 2, (t + b - 1) // 2)

    def to_json(self) -> dict[str, Any]:
        return {"colour": self.colour, "shape": self.shape, "cell": self.cell, "bbox": list(self.bbox)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "ShapeObject":
        return ShapeObject(d["colour"], d["shape"], d["cell"], tuple(int(v) for v in d["bbox"]))


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. Objects are kept in reading order of their cells."""

    objects: tuple[ShapeObject, ...]
    grid: int = 2
    image_size: int = 64
    background: tuple[int, int, int] = (255, 255, 255)
    cells: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "cells", tuple(cell_names(self.grid)))
        order = {c: i for i, c in enumerate(self.cells)}
        for o in self.objects:
            if o.cell not in order:
                raise ValueError(f"object cell {o.cell!r} is not a cell of a {self.grid}x{self.grid} grid")
        if len({o.cell for o in self.objects}) != len(self.objects):
            raise ValueError("two objects in one cell")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: order[o.cell])))

    # ---- ground-truth queries -------------------------------------------------------------
    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        """Number of objects, optionally only those of a shape and/or colour."""
        return sum(1 for o in self.objects
                   if (shape is None or o.shape == shape) and (colour is None or o.colour == colour))

    def has(self, colour: str, shape: str) -> bool:
        return any(o.colour == colour and o.shape == shape for o in self.objects)

    def object_at(self, cell: str) -> ShapeObject | None:
        for o in self.objects:
            if o.cell == cell:
                return o
        return None

    def find(self, colour: str, shape: str) -> ShapeObject | None:
        for o in self.objects:
            if o.colour == colour and o.shape == shape:
                return o
        return None

    @property
    def colours_present(self) -> set[str]:
        return {o.colour for o in self.objects}

    @property
    def shapes_present(self) -> set[str]:
        return {o.shape for o in self.objects}

    @property
    def empty_cells(self) -> list[str]:
        used = {o.cell for o in self.objects}
        return [c for c in self.cells if c not in used]

    def to_json(self) -> dict[str, Any]:
        return {"grid": self.grid, "image_size": self.image_size, "background": list(self.background),
                "objects": [o.to_json() for o in self.objects]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Scene":
        return Scene(tuple(ShapeObject.from_json(o) for o in d["objects"]), grid=int(d["grid"]),
                     image_size=int(d["image_size"]), background=tuple(d["background"]))


def _cell_box(index: int, grid: int, size: int) -> tuple[int, int, int, int]:
    r, c = divmod(index, grid)
    return (c * size // grid, r * size // grid, (c + 1) * size // grid, (r + 1) * size // grid)


def sample_scene(rng: np.random.Generator, config: ShapesConfig) -> Scene:
    """Draw a scene: ``min_objects..max_objects`` objects in distinct cells with distinct
    colour-shape combinations, each sized and (by ``jitter``) offset at random inside its
    cell with at least a 1-pixel margin, so objects never touch or overlap.

    The random draws are the same whatever ``jitter`` is, so jitter 0 gives the same scenes,
    only centred."""
    cells = config.cells
    n_cells = len(cells)
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    cell_idx = sorted(int(i) for i in rng.choice(n_cells, size=n, replace=False))
    n_shapes = len(config.shapes)
    combos = rng.choice(len(config.colours) * n_shapes, size=n, replace=False)
    lo, hi = config.object_size
    objects = []
    for ci, combo in zip(cell_idx, combos):
        colour = config.colours[int(combo) // n_shapes]
        shape = config.shapes[int(combo) % n_shapes]
        x0, y0, x1, y1 = _cell_box(ci, config.grid, config.image_size)
        room = min(x1 - x0, y1 - y0) - 2  # 1-pixel margin on each side
        side = int(round(float(rng.uniform(lo, hi)) * (min(x1 - x0, y1 - y0))))
        side = max(5, min(side, room))
        # offset in [0, 1] of the free room: centred (0.5) +- jitter/2
        fx, fy = 0.5 + config.jitter * (rng.random(2) - 0.5)
        left = x0 + 1 + int(round(float(fx) * (x1 - x0 - 2 - side)))
        top = y0 + 1 + int(round(float(fy) * (y1 - y0 - 2 - side)))
        objects.append(ShapeObject(colour, shape, cells[ci], (left, top, left + side, top + side)))
    return Scene(tuple(objects), grid=config.grid, image_size=config.image_size,
                 background=config.background)


def _draw(draw: ImageDraw.ImageDraw, shape: str, bbox: tuple[int, int, int, int], rgb) -> None:
    l, t, r, b = bbox
    r, b = r - 1, b - 1  # PIL boxes are inclusive
    if shape == "square":
        draw.rectangle([l, t, r, b], fill=rgb)
    elif shape == "circle":
        draw.ellipse([l, t, r, b], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(l, b), (r, b), ((l + r) / 2, t)], fill=rgb)
    elif shape == "diamond":
        mx, my = (l + r) / 2, (t + b) / 2
        draw.polygon([(mx, t), (r, my), (mx, b), (l, my)], fill=rgb)
    elif shape == "cross":
        w = r - l + 1
        bar = max(2, w // 3)
        a = l + (w - bar) // 2
        draw.rectangle([a, t, a + bar - 1, b], fill=rgb)
        a = t + (w - bar) // 2
        draw.rectangle([l, a, r, a + bar - 1], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``scene.image_size`` pixels (solid colours, no
    anti-aliasing). With another ``size``, the drawing is resized with nearest-neighbour
    sampling, which keeps colours exact."""
    img = Image.new("RGB", (scene.image_size, scene.image_size), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o.shape, o.bbox, COLOURS[o.colour])
    if size is not None and size != scene.image_size:
        img = img.resize((size, size), Image.Resampling.NEAREST)
    return img
