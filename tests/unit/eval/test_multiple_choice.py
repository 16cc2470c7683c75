import math

import pytest

from vlmalign.eval.multiple_choice import circular_eval, extract_choice, grouped_accuracy

OPTS = {"A": "cat", "B": "dog", "C": "red car", "D": "car"}


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("(C)", "C"), ("b.", "B"), ("B) dog", "B"),
    ("The answer is D.", "D"), ("Answer: (B) dog", "B"),
    ("I think it is B", "B"),            # "I" before a word is English, not option I
    ("It is a red car", "C"),            # option text; "red car" beats its substring "car"
    ("A or B", None),                    # two letters: ambiguous
    ("a bird", None),                    # nothing matches
    ("The answer is E", None),           # not a valid letter, no option text
])
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTS) == expected


def test_extract_choice_list_options():
    assert extract_choice("dog", ["cat", "dog"]) == "B"


def test_circular_eval_one_failed_rotation_fails_the_question():
    recs = [
        # q1 (category "attr"): 4 rotations, the right letter moves; all right -> hit
        {"question_id": "q1", "category": "attr", "answer": "A", "prediction": "A"},
        {"question_id": "q1", "category": "attr", "answer": "B", "prediction": "B"},
        {"question_id": "q1", "category": "attr", "answer": "C", "prediction": "C"},
        {"question_id": "q1", "category": "attr", "answer": "D", "prediction": "D"},
        # q2 ("attr"): 3 of 4 right -> miss
        {"question_id": "q2", "category": "attr", "answer": "B", "prediction": "B"},
        {"question_id": "q2", "category": "attr", "answer": "C", "prediction": "C"},
        {"question_id": "q2", "category": "attr", "answer": "D", "prediction": "A"},
        {"question_id": "q2", "category": "attr", "answer": "A", "prediction": "A"},
        # q3 ("ocr"): 2 options, one unparsable -> miss
        {"question_id": "q3", "category": "ocr", "answer": "A", "prediction": "A"},
        {"question_id": "q3", "category": "ocr", "answer": "B", "prediction": None},
    ]
    m = circular_eval(recs)
    assert m["accuracy"] == pytest.approx(1 / 3)          # only q1 of 3 questions
    assert m["vanilla_accuracy"] == pytest.approx(8 / 10)  # per record it would be 0.8
    assert m["accuracy/attr"] == pytest.approx(1 / 2) and m["n/attr"] == 2
    assert m["accuracy/ocr"] == 0.0
    assert m["n"] == 3 and m["n_records"] == 10 and m["unparsable"] == 1


def test_circular_eval_bad_input():
    with pytest.raises(ValueError, match=r"item 0: missing field 'answer'"):
        circular_eval([{"question_id": "q", "prediction": "A"}])
    with pytest.raises(ValueError, match=r"item 1: field 'category'"):
        circular_eval([{"question_id": "q", "answer": "A", "prediction": "A", "category": "x"},
                       {"question_id": "q", "answer": "B", "prediction": "B", "category": "y"}])


def test_grouped_accuracy_counts_unparsable_as_wrong():
    preds = ["A", None, "c", "B", "D"]
    answers = ["A", "B", "C", "A", "D"]
    groups = ["natural", "natural", "social", "social", "language"]
    m = grouped_accuracy(preds, answers, groups)
    # right: 0, 2 ("c" == "C"), 4 -> 3/5 over all 5 (the None is not dropped: not 3/4)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["n"] == 5 and m["unparsable"] == 1
    assert m["accuracy/natural"] == pytest.approx(1 / 2) and m["unparsable/natural"] == 1
    assert m["accuracy/social"] == pytest.approx(1 / 2)
    assert m["accuracy/language"] == 1.0
    assert math.isnan(grouped_accuracy([], [])["accuracy"])
    with pytest.raises(ValueError, match=r"item 1: missing field 'answer'"):
        grouped_accuracy(["A", "B"], ["A", None])
