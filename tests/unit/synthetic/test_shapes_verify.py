"""Hand-listed cases for the answer and caption verifiers."""

import pytest

from vlmalign.data.synthetic import (Scene, ShapeObject, answer_matches, caption_errors, hallucinated_mentions,
                                     normalize_answer, parse_caption)


@pytest.mark.parametrize("raw, norm", [
    ("Red", "red"),
    ("  red.  ", "red"),
    ("Yes.", "yes"),
    ("NO!", "no"),
    ("two", "2"),
    ("Two.", "2"),
    ("2", "2"),
    ("zero", "0"),
    ("Top-left", "top left"),
    ("top   left", "top left"),
    ("the top left.", "top left"),
    ("a circle", "circle"),
    ("Centre", "center"),
    ("upper right", "top right"),
    ("lower left", "bottom left"),
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("pred, ref, ok", [
    ("red", "red", True),
    ("Red.", "red", True),
    ("RED", "red", True),
    (" yes. ", "yes", True),
    ("Yes", "yes", True),
    ("two", "2", True),
    ("2", "two", True),
    ("Three.", "3", True),
    ("top-left", "top left", True),
    ("Top left.", "top left", True),
    ("the circle", "circle", True),
    ("no", "yes", False),
    ("yes, there is", "yes", False),   # exact after normalisation: no partial credit
    ("yes no", "yes", False),
    ("blue", "red", False),
    ("3", "2", False),
    ("twenty", "2", False),
    ("top", "top left", False),
    ("left top", "top left", False),
    ("circles", "circle", False),
    ("", "red", False),
    ("...", "red", False),
    (None, "red", False),
    ("green", ["red", "green"], True),  # any of several references
    ("blue", ["red", "green"], False),
])
def test_answer_matches(pred, ref, ok):
    assert answer_matches(pred, ref) is ok


SCENE = Scene((ShapeObject("red", "circle", "top left", (2, 2, 20, 20)),
               ShapeObject("blue", "square", "bottom right", (40, 40, 60, 60))), grid=2)


def test_parse_caption():
    assert parse_caption("A red circle in the top left and a blue square in the bottom right.") == [
        ("red", "circle", "top left"), ("blue", "square", "bottom right")]
    assert parse_caption("An orange cross in the center, a green diamond in the middle left.") == [
        ("orange", "cross", "center"), ("green", "diamond", "middle left")]
    assert parse_caption("There is a red circle in the top center.") == [("red", "circle", "top center")]
    assert parse_caption("Nothing here.") == []


@pytest.mark.parametrize("text, errors", [
    ("A red circle in the top left and a blue square in the bottom right.", 0),
    ("a blue square in the bottom right and a red circle in the top left", 0),  # order free
    ("A green circle in the top left and a blue square in the bottom right.", 1),   # colour
    ("A red square in the top left and a blue square in the bottom right.", 1),     # shape
    ("A red circle in the top left, a green cross in the top right and a blue square "
     "in the bottom right.", 1),                                                    # extra object
    ("A red circle in the top left.", 1),                                           # omission
    ("A blue triangle in the top left and a blue square in the bottom right.", 1),  # both attrs: one cell
    ("A green circle in the top left, a green cross in the top right and a blue circle "
     "in the bottom right.", 3),
    ("A red circle in the top right and a blue square in the bottom right.", 2),    # moved: two cells
    ("A red circle in the top left, a red circle in the top left and a blue square in the "
     "bottom right.", 1),                                                           # repeated
    ("Nothing at all.", 2),
])
def test_caption_errors(text, errors):
    assert caption_errors(text, SCENE) == errors


def test_hallucinated_mentions_and_errors_against_a_scene_or_its_caption():
    scene = Scene((ShapeObject("red", "circle", "top left", (1, 1, 20, 20)),
                   ShapeObject("blue", "square", "bottom right", (40, 40, 60, 60))))
    reference = "A red circle in the top left and a blue square in the bottom right."
    cases = {
        reference: (0, 0),
        # an extra object in an empty cell: one hallucinated mention, one wrong cell
        "A red circle in the top left, a green triangle in the top right and a blue square in the bottom right.": (1, 1),
        # a wrong colour names an absent combination: hallucinated; the cell is wrong
        "A yellow circle in the top left and a blue square in the bottom right.": (1, 1),
        # a present object in the wrong cell is no hallucination, but two cells are wrong
        "A blue square in the top left.": (0, 2),
        # an object left out hallucinates nothing
        "A red circle in the top left.": (0, 1),
        "Nothing to see.": (0, 2),
    }
    for text, (halluc, errors) in cases.items():
        for truth in (scene, reference):
            assert hallucinated_mentions(text, truth) == halluc, text
            assert caption_errors(text, truth) == errors, text
