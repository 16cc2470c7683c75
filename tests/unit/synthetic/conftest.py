"""Shared fixtures: small ShapesWorld datasets generated once per test session, and an
independent oracle that answers a generated question from the scene's ground truth."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlmalign.data.synthetic import Scene, ShapesConfig, generate_shapesworld, load_scenes
from vlmalign.data.synthetic.config import PLURALS

SMALL = ShapesConfig(seed=7, train_images=60, eval_images=30)
# 3x3 grid, all shapes and six colours, up to 5 objects, paraphrased questions, 4-long ranks.
WIDE = ShapesConfig(seed=11, train_images=40, eval_images=20, grid=3, image_size=72,
                    colours=("red", "green", "blue", "yellow", "purple", "orange"),
                    shapes=("circle", "square", "triangle", "cross", "diamond"),
                    min_objects=2, max_objects=5, paraphrases=True, ranked_size=4)
# the quickstart's layout: the image after the question, one question per VQA record
AFTER = ShapesConfig(seed=5, train_images=40, eval_images=20, image_position="after", max_turns=1)
CONFIGS = {"small": SMALL, "wide": WIDE, "after": AFTER}


class Dataset:
    def __init__(self, root: Path, config: ShapesConfig, paths: dict):
        self.root, self.config, self.paths = root, config, paths
        self.scenes: dict[str, Scene] = load_scenes(root)

    def load(self, name: str) -> list[dict]:
        p = self.paths[name]
        if p.suffix == ".jsonl":
            return [json.loads(line) for line in p.read_text().splitlines()]
        return json.loads(p.read_text())


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def dataset(request, tmp_path_factory) -> Dataset:
    config = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(f"shapes_{request.param}")
    return Dataset(root, config, generate_shapesworld(root, config))


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> Dataset:
    root = tmp_path_factory.mktemp("shapes_small_only")
    return Dataset(root, SMALL, generate_shapesworld(root, SMALL))


_SHAPE_OF_PLURAL = {v: k for k, v in PLURALS.items()}
_PATTERNS = [
    (re.compile(r"^(?:what colour is the shape|what is the colour of the shape|"
                r"which colour is the object) in the (.+)\?$"),
     lambda s, m: s.object_at(m[1]).colour),
    (re.compile(r"^(?:what|which|what kind of) shape is in the (.+)\?$"),
     lambda s, m: s.object_at(m[1]).shape),
    (re.compile(r"^(?:how many shapes are there\?|how many objects are in the image\?|"
                r"count the shapes in the image\.)$"),
     lambda s, m: str(len(s.objects))),
    (re.compile(r"^(?:how many (\w+) are there\?|how many (\w+) are in the image\?|"
                r"count the (\w+) in the image\.)$"),
     lambda s, m: str(s.count(shape=_SHAPE_OF_PLURAL[m[1] or m[2] or m[3]]))),
    (re.compile(r"^(?:where is the (\w+) (\w+)(?: located)?\?|"
                r"in which part of the image is the (\w+) (\w+)\?)$"),
     lambda s, m: s.find(m[1] or m[3], m[2] or m[4]).cell),
    (re.compile(r"^(?:is there|does the image contain|can you see) an? (\w+) (\w+)(?: in the image)?\?$"),
     lambda s, m: "yes" if s.has(m[1], m[2]) else "no"),
]


def _text(prompt: str) -> str:
    """A prompt without its image placeholder (``image_position="after"`` spells it out)."""
    return prompt.replace("<image>", "").strip()


def _oracle(question: str, scene: Scene) -> str:
    """The true answer, computed from the scene independently of the generator's code."""
    q = _text(question).lower()
    for pattern, answer in _PATTERNS:
        m = pattern.match(q)
        if m:
            return answer(scene, m)
    raise AssertionError(f"oracle cannot parse question {question!r}")


def _is_caption_prompt(text: str) -> bool:
    return _text(text) in ("Describe the image.", "What is in the image?",
                            "Describe the shapes in the image.")


@pytest.fixture(scope="session")
def oracle():
    """``oracle(question, scene) -> answer``: ground truth computed from the scene with
    hand-written patterns, independently of the generator's code."""
    return _oracle


@pytest.fixture(scope="session")
def is_caption_prompt():
    return _is_caption_prompt
