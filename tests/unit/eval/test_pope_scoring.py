import math

import pytest

from vlmalign.eval.metrics import pope_metrics
from vlmalign.eval.pope import parse_pope_answer, pope_scores


def test_parse_follows_official_script():
    assert parse_pope_answer("No, there is no dog.") == "no"
    assert parse_pope_answer("There is not a dog") == "no"
    assert parse_pope_answer("Yes. But no cat.") == "yes"   # only the first sentence counts
    assert parse_pope_answer("NO") == "yes"                # only "No"/"not"/"no" are no-words
    assert parse_pope_answer("Maybe") == "yes"             # the script's default is yes
    assert parse_pope_answer("no.") == "no"


def test_per_split_and_overall_hand_computed():
    preds = ["Yes", "no", "Yes, there is.", "No.", "maybe",   # random
             "yes", "There is not.", "yes", "no"]            # popular
    labels = ["yes", "yes", "no", "no", "no",
              "yes", "yes", "no", "no"]
    splits = ["random"] * 5 + ["popular"] * 4
    m = pope_scores(preds, labels, splits)
    # random: parsed yes,no,yes,no,yes -> TP=1 (0) FN=1 (1) FP=2 (2,4) TN=1 (3)
    assert (m["random/tp"], m["random/fn"], m["random/fp"], m["random/tn"]) == (1, 1, 2, 1)
    assert m["random/accuracy"] == pytest.approx(2 / 5)
    assert m["random/precision"] == pytest.approx(1 / 3)   # 1 / (1 + 2)
    assert m["random/recall"] == pytest.approx(1 / 2)      # 1 / (1 + 1)
    assert m["random/f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # = 0.4
    assert m["random/yes_ratio"] == pytest.approx(3 / 5)
    # popular: yes,no,yes,no -> TP=1 FN=1 FP=1 TN=1
    assert m["popular/accuracy"] == pytest.approx(0.5) and m["popular/f1"] == pytest.approx(0.5)
    # overall pooled: TP=2 FN=2 FP=3 TN=2 -> acc 4/9, P 2/5, R 2/4, yes 5/9
    assert m["accuracy"] == pytest.approx(4 / 9)
    assert m["precision"] == pytest.approx(2 / 5)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)   # = 4/9
    assert m["yes_ratio"] == pytest.approx(5 / 9)
    assert m["n"] == 9 and m["defaulted_yes"] == 1            # "maybe"


def test_undefined_precision_is_nan():
    m = pope_scores(["no", "no"], ["yes", "no"])
    assert math.isnan(m["precision"]) and m["recall"] == 0.0


def test_existing_pope_metrics_unchanged():
    # the quickstart's parser treats "maybe" as not-yes; the POPE script treats it as yes
    assert pope_metrics(["maybe"], ["no"])["pope_yes_ratio"] == 0.0
    assert pope_scores(["maybe"], ["no"])["yes_ratio"] == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="length mismatch"):
        pope_scores(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match=r"item 1: field 'label'"):
        pope_scores(["yes", "no"], ["yes", "unknown"])
    with pytest.raises(ValueError, match=r"item 0: missing field 'split'"):
        pope_scores(["yes"], ["yes"], [None])
