"""Questions, answers, captions and hallucinated (wrong) variants for a :class:`Scene`.

Answers are short and closed-vocabulary so exact match is meaningful:

============  =========================================  ==============================
type          question (first, canonical phrasing)       answer
============  =========================================  ==============================
colour        What colour is the shape in the top left?  a colour word ("red")
shape         What shape is in the top left?             a shape word ("circle")
count         How many shapes are there? /               digits ("2"; "0" possible for
              How many circles are there?                a shape that is absent)
position      Where is the red circle?                   a cell name ("top left")
existence     Is there a red circle in the image?        "yes" / "no"
============  =========================================  ==============================

Captions list the objects in reading order of their cells:
"A red circle in the top left and a blue square in the bottom right."
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import CAPTION_ERROR_KINDS, PLURALS, ShapesConfig, cell_names
from .scene import Scene

TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape in the {cell}?",
               "What is the colour of the shape in the {cell}?",
               "Which colour is the object in the {cell}?"),
    "shape": ("What shape is in the {cell}?",
              "Which shape is in the {cell}?",
              "What kind of shape is in the {cell}?"),
    "count_all": ("How many shapes are there?",
                  "How many objects are in the image?",
                  "Count the shapes in the image."),
    "count_shape": ("How many {plural} are there?",
                    "How many {plural} are in the image?",
                    "Count the {plural} in the image."),
    "position": ("Where is the {colour} {shape}?",
                 "In which part of the image is the {colour} {shape}?",
                 "Where is the {colour} {shape} located?"),
    "existence": ("Is there {article} {colour} {shape} in the image?",
                  "Does the image contain {article} {colour} {shape}?",
                  "Can you see {article} {colour} {shape}?"),
    "caption": ("Describe the image.",
                "What is in the image?",
                "Describe the shapes in the image."),
}

def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


@dataclass
class QA:
    """A question about one scene with its reference answer.

    ``meta`` holds what was asked about: ``variant`` (count: all/shape; existence:
    present/random/adversarial), ``cell``, ``object``.
    """

    question: str
    answer: str
    question_type: str
    meta: dict[str, Any] = field(default_factory=dict)


def _template(kind: str, rng: np.random.Generator, config: ShapesConfig) -> str:
    options = TEMPLATES[kind]
    return options[int(rng.integers(len(options)))] if config.paraphrases else options[0]


def _pick(rng: np.random.Generator, seq):
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def absent_objects(scene: Scene, config: ShapesConfig, category: str) -> list[tuple[str, str]]:
    """Colour-shape combinations not in the scene. ``random``: all of them; ``adversarial``:
    those whose colour or shape IS in the scene (POPE's hard negatives)."""
    out = []
    for c in config.colours:
        for s in config.shapes:
            if scene.has(c, s):
                continue
            if category == "adversarial" and c not in scene.colours_present \
                    and s not in scene.shapes_present:
                continue
            out.append((c, s))
    return out


def existence_qa(scene: Scene, rng: np.random.Generator, config: ShapesConfig,
                 variant: str) -> QA | None:
    """``variant`` present (answer yes), random or adversarial (answer no). None when the
    scene has no candidate for the variant (adversarial only, in tiny configurations)."""
    if variant == "present":
        o = _pick(rng, scene.objects)
        colour, shape, answer = o.colour, o.shape, "yes"
    else:
        cands = absent_objects(scene, config, variant)
        if not cands:
            return None
        colour, shape = _pick(rng, cands)
        answer = "no"
    q = _template("existence", rng, config).format(article=article(colour), colour=colour, shape=shape)
    return QA(q, answer, "existence", {"variant": variant, "object": f"{colour} {shape}"})


def ask(scene: Scene, qtype: str, rng: np.random.Generator, config: ShapesConfig,
        variant: str | None = None) -> QA:
    """One question of ``qtype`` about ``scene`` with its reference answer.

    ``variant``: for count "all" or "shape"; for existence "present", "random" or
    "adversarial" (adversarial falls back to random when impossible). Drawn when None.
    """
    if qtype in ("colour", "shape"):
        o = _pick(rng, scene.objects)
        q = _template(qtype, rng, config).format(cell=o.cell)
        return QA(q, o.colour if qtype == "colour" else o.shape, qtype,
                  {"cell": o.cell, "object": o.name})
    if qtype == "position":
        o = _pick(rng, scene.objects)
        q = _template("position", rng, config).format(colour=o.colour, shape=o.shape)
        return QA(q, o.cell, qtype, {"cell": o.cell, "object": o.name})
    if qtype == "count":
        variant = variant or ("all" if rng.random() < 0.5 else "shape")
        if variant == "all":
            return QA(_template("count_all", rng, config), str(len(scene.objects)), qtype,
                      {"variant": "all"})
        shape = _pick(rng, config.shapes)
        q = _template("count_shape", rng, config).format(plural=PLURALS[shape])
        return QA(q, str(scene.count(shape=shape)), qtype, {"variant": "shape", "shape": shape})
    if qtype == "existence":
        if variant is None:
            variant = "present" if rng.random() < 0.5 else _pick(rng, ("random", "adversarial"))
        qa = existence_qa(scene, rng, config, variant)
        if qa is None:
            qa = existence_qa(scene, rng, config, "random")
        return qa
    raise ValueError(f"unknown question type {qtype!r}")


def wrong_answer(scene: Scene, qa: QA, rng: np.random.Generator, config: ShapesConfig) -> str:
    """A hallucinated answer to ``qa``: a wrong colour or shape (half the time one that IS in
    the image elsewhere), a wrong cell, a count off by one, or the opposite yes/no."""
    t, a = qa.question_type, qa.answer
    if t in ("colour", "shape"):
        vocab = config.colours if t == "colour" else config.shapes
        present = scene.colours_present if t == "colour" else scene.shapes_present
        near = sorted(v for v in present if v != a)
        if near and rng.random() < 0.5:
            return _pick(rng, near)
        return _pick(rng, [v for v in vocab if v != a])
    if t == "position":
        return _pick(rng, [c for c in scene.cells if c != a])
    if t == "count":
        n = int(a)
        return str(n + 1) if n == 0 or rng.random() < 0.5 else str(n - 1)
    if t == "existence":
        return "no" if a == "yes" else "yes"
    raise ValueError(f"unknown question type {t!r}")


# ---- captions ---------------------------------------------------------------------------

Triple = tuple[str, str, str]  # (colour, shape, cell)


def describe(objects: list[Triple], grid: int) -> str:
    """Caption for objects given as (colour, shape, cell), listed in reading order of cells."""
    order = {c: i for i, c in enumerate(cell_names(grid))}
    objs = sorted(objects, key=lambda t: order[t[2]])
    phrases = [f"{article(c)} {c} {s} in the {cell}" for c, s, cell in objs]
    if not phrases:
        return "An empty image."
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def caption(scene: Scene) -> str:
    """The correct caption of ``scene``."""
    return describe([(o.colour, o.shape, o.cell) for o in scene.objects], scene.grid)


def corrupted_captions(scene: Scene, rng: np.random.Generator, config: ShapesConfig,
                       kinds: list[str]) -> list[tuple[str, list[str]]]:
    """Captions with 1, 2, ... errors (cumulative: caption k has the errors of caption k-1
    plus one), one per entry of ``kinds`` (colour, shape, extra_object).

    Every error is in a different cell: an object given a wrong colour or shape, or an object
    added to an empty cell. A kind that is impossible falls back to another. Returns
    ``[(caption, applied_kinds), ...]``.
    """
    objs: dict[str, tuple[str, str]] = {o.cell: (o.colour, o.shape) for o in scene.objects}
    touched: set[str] = set()
    applied: list[str] = []
    out = []
    for want in kinds:
        order = [want] + [k for k in CAPTION_ERROR_KINDS if k != want]
        for kind in order:
            if _corrupt_one(objs, touched, kind, scene, rng, config):
                applied.append(kind)
                break
        else:
            raise ValueError("no cell left to corrupt")
        out.append((describe([(c, s, cell) for cell, (c, s) in objs.items()], scene.grid),
                    list(applied)))
    return out


def _corrupt_one(objs, touched, kind, scene, rng, config) -> bool:
    combos_used = set(objs.values())
    if kind == "extra_object":
        empty = [c for c in scene.cells if c not in objs and c not in touched]
        cands = [(c, s) for c in config.colours for s in config.shapes
                 if (c, s) not in combos_used and not scene.has(c, s)]
        if not empty or not cands:
            return False
        cell = _pick(rng, empty)
        objs[cell] = _pick(rng, cands)
        touched.add(cell)
        return True
    cells = [c for c in scene.cells if c in objs and c not in touched]
    rng_cells = list(cells)
    while rng_cells:
        cell = rng_cells.pop(int(rng.integers(len(rng_cells))))
        colour, shape = objs[cell]
        if kind == "colour":
            cands = [(c, shape) for c in config.colours if c != colour and (c, shape) not in combos_used]
        else:
            cands = [(colour, s) for s in config.shapes if s != shape and (colour, s) not in combos_used]
        if cands:
            objs[cell] = _pick(rng, cands)
            touched.add(cell)
            return True
    return False
