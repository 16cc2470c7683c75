"""Verifiers for rewards and evaluation: short answers and captions against ground truth.

Short answers are compared after :func:`normalize_answer`: lower case, punctuation and extra
whitespace removed, the articles a/an/the dropped, number words turned into digits ("two" ->
"2"), and a few spelling variants unified ("centre" -> "center", "upper" -> "top", "lower" ->
"bottom", "grey" -> "gray"). The comparison is otherwise exact: "yes, there is" does not match
"yes" (rewards should teach the short closed-vocabulary answers the data uses).
"""

from __future__ import annotations

import re
import string
from typing import Iterable

from .config import COLOURS, SHAPES, cell_names
from .scene import Scene

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
_SYNONYMS = {"centre": "center", "upper": "top", "lower": "bottom", "grey": "gray", "none": "0"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_answer(s: str) -> str:
    """Canonical form of a short answer: ``" Two."`` -> ``"2"``, ``"Top-left"`` -> ``"top left"``.

    Articles are dropped (``"a circle"`` -> ``"circle"``), except a lone ``"a"``: that is the
    multiple-choice letter A, which must still match the reference ``"A"``."""
    s = _PUNCT.sub(" ", str(s).lower())
    toks = s.split()
    if toks == ["a"]:
        return "a"
    out = []
    for tok in toks:
        if tok in _ARTICLES:
            continue
        tok = _NUMBERS.get(tok, tok)
        tok = _SYNONYMS.get(tok, tok)
        out.append(tok)
    return " ".join(out)


def answer_matches(prediction: str | None, reference: str | Iterable[str]) -> bool:
    """True when ``prediction`` equals ``reference`` (or any of several references) after
    :func:`normalize_answer`. An empty or missing prediction never matches."""
    if prediction is None:
        return False
    pred = normalize_answer(prediction)
    if not pred:
        return False
    refs = [reference] if isinstance(reference, str) else list(reference)
    return any(pred == normalize_answer(r) for r in refs)


_CELLS = sorted(set(cell_names(2)) | set(cell_names(3)), key=len, reverse=True)
_CAPTION_OBJ = re.compile(
    r"\b(?:a|an)\s+(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")\s+in\s+the\s+("
    + "|".join(c.replace(" ", r"\s+") for c in _CELLS) + r")\b")


def parse_caption(text: str) -> list[tuple[str, str, str]]:
    """The ``(colour, shape, cell)`` triples a caption states, in order of appearance.

    Understands the generator's phrasing "a red circle in the top left" (case-insensitive,
    any surrounding words); anything else is ignored.
    """
    return [(m.group(1), m.group(2), " ".join(m.group(3).split()))
            for m in _CAPTION_OBJ.finditer(str(text).lower())]


def _truth(scene: "Scene | str") -> dict[str, tuple[str, str]]:
    """``{cell: (colour, shape)}`` of a scene, or of the objects a reference caption states."""
    if isinstance(scene, str):
        return {cell: (colour, shape) for colour, shape, cell in parse_caption(scene)}
    return {o.cell: (o.colour, o.shape) for o in scene.objects}


def caption_errors(caption: str, scene: "Scene | str") -> int:
    """Number of grid cells a caption gets wrong: an object described with a wrong colour or
    shape, an object described in an empty cell (hallucinated), or an object left out each
    count once; a cell described twice counts once per extra description. ``scene``: the
    ground truth, or a reference caption that states it (ShapesWorld's captions do)."""
    described: dict[str, list[tuple[str, str]]] = {}
    for colour, shape, cell in parse_caption(caption):
        described.setdefault(cell, []).append((colour, shape))
    truth = _truth(scene)
    errors = 0
    for cell in set(described) | set(truth):
        said = described.get(cell, [])
        true = truth.get(cell)
        if true is None:
            errors += len(said)
        elif not said:
            errors += 1
        else:
            errors += (said[0] != true) + (len(said) - 1)
    return errors


def hallucinated_mentions(caption: str, scene: "Scene | str") -> int:
    """Object mentions of a caption whose colour-shape combination is not in the image (CHAIR's
    notion, ShapesWorld objects being colour-shape combinations; each mention counts). ``scene``
    as in :func:`caption_errors`."""
    present = set(_truth(scene).values())
    return sum((colour, shape) not in present for colour, shape, _ in parse_caption(caption))
