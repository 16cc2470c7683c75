"""ShapesWorld: the embedded synthetic dataset (coloured shapes in a coarse grid).

Deterministic (same seed + config -> byte-identical files), small and learnable by a tiny
random-init VLM on a CPU, with short closed-vocabulary answers so exact match is meaningful.

    from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld, answer_matches
    paths = generate_shapesworld("data/shapes", ShapesConfig(seed=0))
    answer_matches("Two.", "2")  # True

See :mod:`.generate` for the files written and their formats, :mod:`.tasks` for questions
and answers, :mod:`.scene` for the ground-truth scene API, :mod:`.verify` for the verifiers.
"""

from .config import COLOURS, QUESTION_TYPES, SHAPES, ShapesConfig, cell_names
from .generate import FILES, build_records, generate_shapesworld, load_scenes, make_scenes
from .scene import Scene, ShapeObject, render, sample_scene
from .tasks import QA, TEMPLATES, ask, caption, corrupted_captions, describe, wrong_answer
from .verify import answer_matches, caption_errors, hallucinated_mentions, normalize_answer, parse_caption

__all__ = [
    "COLOURS", "SHAPES", "QUESTION_TYPES", "ShapesConfig", "cell_names",
    "FILES", "generate_shapesworld", "build_records", "make_scenes", "load_scenes",
    "Scene", "ShapeObject", "render", "sample_scene",
    "QA", "TEMPLATES", "ask", "caption", "describe", "corrupted_captions", "wrong_answer",
    "answer_matches", "normalize_answer", "parse_caption", "caption_errors", "hallucinated_mentions",
]
