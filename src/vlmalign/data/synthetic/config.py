"""Configuration of ShapesWorld: one dataclass, every field documented, validated on creation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ...config import ConfigError, check_bounds, opt

# Solid, well separated RGB values. Drawing uses no anti-aliasing, so every object pixel has
# exactly its palette value (tests and the scene API rely on this).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
    "cyan": (20, 190, 200),
    "black": (20, 20, 20),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")

# Plural forms used in count questions ("How many crosses are there?").
PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "cross": "crosses", "diamond": "diamonds",
}

IMAGE_POSITIONS: tuple[str, ...] = ("before", "after")
# Kinds of wrong object mention in a caption: an object named with a wrong colour or shape, or an
# object added in an empty cell. Each names a colour-shape combination that is not in the image.
CAPTION_ERROR_KINDS: tuple[str, ...] = ("colour", "shape", "extra_object")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "existence")

_ROWS = {1: ("",), 2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COLS = {1: ("",), 2: ("left", "right"), 3: ("left", "center", "right")}


def cell_names(grid: int) -> list[str]:
    """Names of the cells of a ``grid`` x ``grid`` layout in row-major (reading) order.

    2x2: top left, top right, bottom left, bottom right. 3x3 adds "top center", "middle left",
    "center", "middle right", "bottom center". These names are the answers of position
    questions and appear verbatim in captions.
    """
    if grid not in (2, 3):
        raise ValueError(f"grid must be 2 or 3, got {grid!r}")
    names = []
    for r in _ROWS[grid]:
        for c in _COLS[grid]:
            if r == "middle" and c == "center":
                names.append("center")
            else:
                names.append(f"{r} {c}")
    return names


@dataclass(frozen=True)
class ShapesConfig:
    """Everything that determines a ShapesWorld dataset. Same config -> byte-identical files.

    Defaults are tuned to be learnable by a tiny random-init VLM (vision tower of ~2 layers,
    hidden 32-64, patch 8) in a few hundred steps on a CPU.
    """

    seed: int = opt(0, "master seed; every image and every question derives its own generator from it", ge=0)
    image_size: int = opt(64, "width and height of the square images in pixels", ge=8)
    colours: tuple[str, ...] = opt(("red", "green", "blue", "yellow"),
                                   "comma-separated colour names (of red green blue yellow purple orange cyan black)")
    shapes: tuple[str, ...] = opt(("circle", "square", "triangle"),
                                  "comma-separated shape names (of circle square triangle cross diamond)")
    grid: int = opt(2, "cells per side: 2 (top left ... bottom right) or 3 (adds middle / center)", (2, 3))
    min_objects: int = opt(1, "fewest objects in an image (one per cell, distinct colour-shape combinations)", ge=1)
    max_objects: int = opt(3, "most objects in an image", ge=1)
    train_images: int = opt(1000, "images in the train split (captions, VQA SFT, preferences, ranked, RL, KTO "
                                  "train)", ge=1)
    eval_images: int = opt(200, "images in the held-out eval split (disjoint from train, pixel-wise)", ge=1)
    question_types: tuple[str, ...] = opt(QUESTION_TYPES, "comma-separated question types to ask (of colour, shape, "
                                                          "count, position, existence)")
    paraphrases: bool = opt(False, "several phrasings per question type (default: one fixed phrasing each, easiest)")
    object_size: tuple[float, float] = opt((0.7, 0.85), "range of an object's side as a fraction of the cell side "
                                                        "(drawn uniformly)")
    jitter: float = opt(0.5, "random offset of an object inside its cell, as a fraction of the free room around it: "
                             "0 (or False) centres it, 1 (or True) places it anywhere in the cell", ge=0, le=1)
    background: tuple[int, int, int] = opt((255, 255, 255), "background RGB")
    max_turns: int = opt(3, "longest multi-turn VQA SFT conversation (questions about one image grouped "
                            "1..max_turns)", ge=1)
    image_position: str = opt("before", "where the image goes in the first user turn: before its text (LLaVA's "
                                        "'<image>\\n' convention; VQA, plain_dpo and KTO prompts then carry no "
                                        "placeholder, which readers take to mean image first) or after it ('What "
                                        "colour ...?\\n<image>' in every file); after lets a tiny causal LM's "
                                        "image tokens see the question (README, Quickstart)", IMAGE_POSITIONS)
    descriptions: float = opt(0.0, "share of train images that also get a description conversation ('Describe "
                                   "the image.' -> its caption) in sft_train.json, the SFT mix (vqa_train.json's "
                                   "conversations plus these)", ge=0, le=1)
    hallucination: float = opt(0.0, "share of those descriptions that mention an object the image does not hold, "
                                    "as machine-generated instruction data does (kinds: hallucination_kinds); "
                                    "the manifest lists which records", ge=0, le=1)
    hallucination_kinds: tuple[str, ...] = opt(("extra_object",), "comma-separated kinds of hallucinated mention in "
                                                                  "the SFT mix and in hallucination_{train,eval}.json, "
                                                                  "drawn in turn: extra_object (an absent object in "
                                                                  "an empty cell), colour, shape (an object named "
                                                                  "with a wrong colour or shape)")
    pair_kinds: tuple[str, ...] = opt((), "comma-separated kinds of hallucinated mention in the rejected "
                                           "descriptions of hallucination_{train,eval}.json, drawn in turn (empty: "
                                           "hallucination_kinds): the pairs can teach against more than the SFT mix "
                                           "holds, e.g. colours and shapes the model perceives wrong")
    ranked_size: int = opt(3, "responses per ranked list: the correct caption, then captions with 1, 2, ... errors",
                           ge=2)

    def __post_init__(self):
        # Normalise sequences to tuples (from JSON/CLI they may come as lists) and spellings.
        object.__setattr__(self, "colours", tuple(self.colours))
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "hallucination_kinds", tuple(self.hallucination_kinds))
        object.__setattr__(self, "pair_kinds", tuple(self.pair_kinds))
        object.__setattr__(self, "question_types",
                           tuple("colour" if q == "color" else q for q in self.question_types))
        object.__setattr__(self, "object_size", tuple(float(x) for x in self.object_size))
        object.__setattr__(self, "background", tuple(int(x) for x in self.background))
        object.__setattr__(self, "jitter", float(self.jitter))
        self.validate()

    def validate(self) -> None:
        """The declared choices and ranges of the fields, then the rules between them."""
        def bad(msg):
            raise ValueError(f"ShapesConfig: {msg}")

        for f in fields(self):
            v, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and v not in choices:
                bad(f"{f.name} must be one of {', '.join(map(str, choices))}, got {v!r}")
            try:
                check_bounds(v, f.metadata.get("bounds") or {}, f.name)
            except ConfigError as e:
                bad(str(e))

        for c in self.colours:
            if c not in COLOURS:
                bad(f"unknown colour {c!r} (known: {', '.join(COLOURS)})")
        for s in self.shapes:
            if s not in SHAPES:
                bad(f"unknown shape {s!r} (known: {', '.join(SHAPES)})")
        for q in self.question_types:
            if q not in QUESTION_TYPES:
                bad(f"unknown question type {q!r} (known: {', '.join(QUESTION_TYPES)})")
        if len(set(self.colours)) != len(self.colours) or len(set(self.shapes)) != len(self.shapes):
            bad("colours and shapes must not repeat")
        if len(self.colours) < 2 or len(self.shapes) < 2:
            bad("need at least 2 colours and 2 shapes (wrong answers must exist)")
        if not self.question_types:
            bad("question_types is empty")
        for k in self.hallucination_kinds:
            if k not in CAPTION_ERROR_KINDS:
                bad(f"unknown hallucination kind {k!r} (known: {', '.join(CAPTION_ERROR_KINDS)})")
        if not self.hallucination_kinds:
            bad("hallucination_kinds is empty")
        for k in self.pair_kinds:
            if k not in CAPTION_ERROR_KINDS:
                bad(f"unknown pair kind {k!r} (known: {', '.join(CAPTION_ERROR_KINDS)})")
        cell_names(self.grid)  # raises for an unsupported grid
        n_cells = self.grid * self.grid
        if not 1 <= self.min_objects <= self.max_objects:
            bad(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > n_cells:
            bad(f"max_objects must be at most the number of cells ({n_cells}), got {self.max_objects}")
        if self.max_objects >= len(self.colours) * len(self.shapes):
            # some colour-shape combination must be absent from every image ("no" answers)
            bad("max_objects must be below the number of colour-shape combinations")
        if self.image_size < 8 * self.grid:
            bad(f"image_size must be at least {8 * self.grid} for a {self.grid}x{self.grid} grid")
        lo, hi = self.object_size
        if not 0.2 <= lo <= hi <= 1.0:
            bad(f"object_size must satisfy 0.2 <= low <= high <= 1.0, got {self.object_size}")
        if not 2 <= self.ranked_size <= n_cells + 1:
            bad(f"ranked_size must be in 2..{n_cells + 1} (one error per cell at most)")
        if len(self.background) != 3 or any(not 0 <= v <= 255 for v in self.background):
            bad("background must be an RGB triple of 0..255")
        if self.background in [COLOURS[c] for c in self.colours]:
            bad("background equals an object colour")

    @property
    def cells(self) -> list[str]:
        return cell_names(self.grid)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapesConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ShapesConfig: unknown keys {sorted(unknown)}")
        return cls(**d)
