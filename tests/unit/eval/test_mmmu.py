import math
import random

import pytest

from vlmalign.eval.mmmu import (DISCIPLINES, MMSTAR_CATEGORIES, mmmu_open_correct, mmmu_scores,
                                mmstar_gain, mmstar_scores, normalize_mmmu_str,
                                parse_mmmu_choice, parse_mmmu_open, parse_mmstar_answer)

OPTS = ["red apple", "green pear", "blue plum", "apple"]


@pytest.mark.parametrize("response, expected", [
    ("(B)", "B"),                                 # rule 1: bracketed letter
    ("B.", "B"),                                  # edge "." stripped, then " B " (rule 2)
    ("The answer is (A), not (C).", "C"),         # two bracketed: the last-occurring wins
    ("I pick A or maybe C here", "C"),            # two spaced letters: the last wins
    ("(C) then A", "C"),                          # a bracketed letter beats a spaced one
    ("b", None),                                  # letters are case-sensitive
    ("A,.", None),                                # strip(",") then strip("."): "A," is left
    ("It is definitely the green pear I think", "B"),  # > 5 words: option text (rule 3)
    ("green pear it is", None),                   # 4 words: rule 3 not tried
    ("I think red apple or apple is best", "D"),  # "apple" occurs last (rfind) -> D
    ("I really do not know the answer", None),    # nothing parses: None, not a random pick
])
def test_choice_parsing_follows_published_rules(response, expected):
    assert parse_mmmu_choice(response, OPTS) == expected


def test_choice_accepts_a_letter_dict_and_random_fallback_is_opt_in():
    assert parse_mmmu_choice("answer (D)", {"C": "x", "D": "y"}) == "D"
    picked = parse_mmmu_choice("no idea", OPTS, random_fallback=True, rng_seed=0)
    assert picked == random.Random(0).choice(["A", "B", "C", "D"])


def test_open_parsing_key_responses_and_numbers():
    # "is " -> "3,000"; numbers: "3,000" (comma pattern) and "000" (the plain pattern skips the
    # "3" before the comma); both normalise to floats -> 3000.0 and 0.0
    assert parse_mmmu_open("The answer is 3,000.") == [3000.0, 0.0]
    # line 1: shortest tail "12.5 meters." (after "is "); line 2: "12.50" -> 12.5 (2 decimals)
    assert parse_mmmu_open("So the value is 12.5 meters.\nTherefore the answer is 12.50") == [
        "12.5 meters.", 12.5]
    # "=" only counts in the last line; "2e3" is scientific (2000.0), and the plain pattern still
    # finds the trailing "3"
    assert parse_mmmu_open("x = 2e3") == [2000.0, 3.0]
    assert parse_mmmu_open("Paris") == ["paris"]           # no indicator: the whole response
    assert parse_mmmu_open("It is A") == [" a", "a "]      # one character -> padded pair


def test_normalize_and_open_correctness():
    assert normalize_mmmu_str(" 1,234.567 ") == [1234.57]
    assert normalize_mmmu_str("B") == [" b", "b "]
    assert mmmu_open_correct([3000.0, 0.0], "3000")
    assert mmmu_open_correct(["the capital paris"], ["Rome", "Paris"])  # gold is a substring
    assert not mmmu_open_correct(["parisian"], "3")                      # 3.0 vs a string
    assert not mmmu_open_correct([12.5], "12.51")
    # a one-letter gold only matches as a separate word: " a" / "a " in the prediction
    assert mmmu_open_correct(parse_mmmu_open("it is a"), "a")
    assert not mmmu_open_correct(["xa"], "a")


def test_mmmu_scores_overall_subject_and_discipline():
    recs = [
        {"id": "validation_Art_Theory_1", "question_type": "multiple-choice", "answer": "B",
         "options": OPTS, "response": "(B)"},                        # right
        {"id": "validation_Art_Theory_2", "question_type": "multiple-choice", "answer": "A",
         "options": OPTS, "response": "hmm"},                        # unparsable -> wrong
        {"subject": "Music", "question_type": "open", "answer": "3000",
         "response": "The answer is 3,000."},                        # right
        {"subject": "Math", "question_type": "open", "answer": ["7"],
         "parsed": [8.0]},                                           # wrong
        {"subject": "Math", "question_type": "multiple-choice", "answer": ["A", "C"],
         "parsed": "C"},                                             # right (one of the golds)
    ]
    m = mmmu_scores(recs)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["n"] == 5 and m["correct"] == 3
    assert m["unparsable"] == 1 and m["n_multiple_choice"] == 3 and m["n_open"] == 2
    assert m["Art_Theory/accuracy"] == pytest.approx(1 / 2) and m["Art_Theory/unparsable"] == 1
    assert m["Music/accuracy"] == 1.0 and m["Math/accuracy"] == pytest.approx(1 / 2)
    # Art and Design = Art_Theory + Music: 2 right of 3 (instance level, not a mean of subjects)
    assert m["Overall-Art and Design/accuracy"] == pytest.approx(2 / 3)
    assert m["Overall-Art and Design/n"] == 3
    assert m["Overall-Science/accuracy"] == pytest.approx(1 / 2)
    assert "Overall-Business/accuracy" not in m
    assert sum(len(v) for v in DISCIPLINES.values()) == 30


def test_mmmu_scores_bad_input():
    with pytest.raises(ValueError, match=r"item 0: missing field 'answer'"):
        mmmu_scores([{"question_type": "open", "response": "x"}])
    with pytest.raises(ValueError, match=r"item 0: field 'question_type'"):
        mmmu_scores([{"question_type": "mcq", "answer": "A", "parsed": "A"}])
    with pytest.raises(ValueError, match=r"item 1: missing field 'options'"):
        mmmu_scores([{"question_type": "open", "answer": "1", "response": "1"},
                     {"question_type": "multiple-choice", "answer": "A", "response": "(A)"}])
    with pytest.raises(ValueError, match=r"item 0: field 'subject'"):
        mmmu_scores([{"subject": "Alchemy", "question_type": "open", "answer": "1",
                      "response": "1"}])
    assert math.isnan(mmmu_scores([])["accuracy"])


@pytest.mark.parametrize("prediction, expected", [
    ("B", "B"), ("b) a cat", "B"), ("(c) the dog", "C"), ("Option d", "D"),
    ("The answer is A.", "A"),
    ("A cat on a mat", "A"),     # the official rule reads the first character: a quirk kept
    ("the answer: B", None),     # "the answer: " is not a prefix it knows -> "t" -> no option
    ("E", None), ("", None), ("(", None),
])
def test_mmstar_prefix_rule(prediction, expected):
    assert parse_mmstar_answer(prediction) == expected


def test_mmstar_scores_per_category_and_l2():
    cp, fp = "coarse perception", "fine-grained perception"
    recs = [
        {"category": cp, "l2_category": "image emotion", "answer": "A", "prediction": "A"},
        {"category": cp, "l2_category": "image emotion", "answer": "B", "prediction": "(c)"},
        {"category": cp, "l2_category": "image style & quality", "answer": "D",
         "prediction": "The answer is D"},
        {"category": fp, "l2-category": "localization", "answer": "C", "prediction": "no idea"},
        {"category": fp, "l2-category": "localization", "answer": "C", "parsed": "C"},
    ]
    m = mmstar_scores(recs)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["n"] == 5 and m["unparsable"] == 1
    assert m[f"{cp}/accuracy"] == pytest.approx(2 / 3) and m[f"{cp}/n"] == 3
    assert m[f"{cp}/image emotion/accuracy"] == pytest.approx(1 / 2)
    assert m[f"{cp}/image style & quality/accuracy"] == 1.0
    assert m[f"{fp}/localization/accuracy"] == pytest.approx(1 / 2)
    assert m[f"{fp}/localization/unparsable"] == 1
    assert len(MMSTAR_CATEGORIES) == 6 and all(len(v) == 3 for v in MMSTAR_CATEGORIES.values())
    with pytest.raises(ValueError, match=r"item 0: field 'l2_category'"):
        mmstar_scores([{"category": cp, "l2_category": "localization", "answer": "A",
                        "prediction": "A"}])
    with pytest.raises(ValueError, match=r"item 0: missing field 'l2_category'"):
        mmstar_scores([{"category": cp, "answer": "A", "prediction": "A"}])


def test_mmstar_gain_and_leakage():
    # README example for LLaVA-Next-34B: S_v 52.1, S_wv 22.7, S_t 20.3 -> MG 29.4, ML 2.4
    g = mmstar_gain(52.1, 22.7, 20.3)
    assert g["mg"] == pytest.approx(29.4) and g["ml"] == pytest.approx(2.4)
    assert mmstar_gain(50.0, 20.0, 30.0)["ml"] == 0.0       # max(0, -10)
    assert math.isnan(mmstar_gain(50.0, 20.0)["ml"])
