import pytest

from vlmalign.eval.vqa_soft import (normalize_vqa_answer, process_punctuation, vqa_soft_accuracy,
                                    vqa_soft_score)


def test_normalisation_rules():
    assert normalize_vqa_answer("Two dogs.") == "2 dogs"        # number word, period, case
    assert normalize_vqa_answer("The Red Car") == "red car"     # article dropped
    assert normalize_vqa_answer("dont") == "don’t"              # contraction table
    assert normalize_vqa_answer("3.5") == "3.5"                 # period before a digit kept
    assert process_punctuation("1,000") == "1000"               # digit,digit comma: deleted
    assert process_punctuation("yes, sir") == "yes sir"         # ", " touches a space: deleted
    assert process_punctuation("a/b") == "a b"                  # else replaced by a space


def test_two_of_ten_humans_gives_point_six():
    humans = ["cat", "cat"] + ["dog"] * 8
    # leave out one of the 2 "cat": 1 match in 9 -> 1/3 (x2); leave out a "dog": 2 -> 2/3 (x8)
    # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 0.6   (not min(2/3, 1) = 0.667)
    assert vqa_soft_score("Cat.", humans) == pytest.approx(0.6)


def test_three_and_four_matches():
    # 3 matches: leave out a match -> 2/3 (x3), leave out another -> 1 (x7): (2 + 7) / 10 = 0.9
    assert vqa_soft_score("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    # 4 matches: every subset of 9 keeps >= 3 -> 1.0
    assert vqa_soft_score("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0


def test_references_only_punctuation_processed_unless_asked():
    humans = ["two"] * 5 + ["2"] * 5
    # pred "two" -> "2"; references "two" are not number-mapped by the official tool:
    # 5 matches ("2") -> every subset keeps >= 4 -> 1.0 ; and pred "2" likewise 1.0
    assert vqa_soft_score("two", humans) == 1.0
    # identical references are left as given: "Two" never equals the normalised "2"
    assert vqa_soft_score("two", ["Two"] * 10) == 0.0
    assert vqa_soft_score("two", ["Two"] * 10, normalize_references=True) == 1.0


def test_dataset_mean_and_groups():
    preds = ["cat", "2", "no"]
    humans = [["cat", "cat"] + ["dog"] * 8, ["2"] * 10, ["yes"] * 10]
    m = vqa_soft_accuracy(preds, humans, groups=["other", "number", "yes/no"])
    # (0.6 + 1.0 + 0.0) / 3 = 1.6 / 3
    assert m["accuracy"] == pytest.approx(1.6 / 3) and m["n"] == 3
    assert m["accuracy/other"] == pytest.approx(0.6) and m["n/number"] == 1


def test_bad_input():
    with pytest.raises(ValueError, match="length mismatch"):
        vqa_soft_accuracy(["a"], [])
    with pytest.raises(ValueError, match=r"item 1: field 'answers'"):
        vqa_soft_accuracy(["a", "b"], [["a"] * 10, []])
    with pytest.raises(ValueError, match=r"item 0: field 'answers'"):
        vqa_soft_accuracy(["a"], ["a"])
