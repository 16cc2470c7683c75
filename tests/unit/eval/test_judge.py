"""Judge parsing and aggregation (eval/judge.py), values worked out by hand."""

import math

import pytest

from vlmalign.config import ConfigError
from vlmalign.eval.judge import (check_template, pair_outcome, pairwise_results, parse_point_score, parse_verdict,
                                 pointwise_scores)


@pytest.mark.parametrize("reply,want", [("85. Good answer", 85), ("Score 7 of 10, maybe 90", 7),
                                        ("150 points", 100), ("-3", 0), ("no number here", None), ("", None)])
def test_point_score_is_the_first_integer_clamped(reply, want):
    assert parse_point_score(reply) == want


@pytest.mark.parametrize("reply,want", [("1", "1"), ("2. The second is better", "2"), ("Tie: both fine", "tie"),
                                        ("Answer 1 is better", "1"), ("12 reasons", None), ("neither", None)])
def test_verdict_is_the_first_1_2_or_tie_word(reply, want):
    assert parse_verdict(reply) == want


def test_pointwise_mean_is_over_parsed_scores_and_unparsable_is_counted():
    # scores 80, 40, None, 90 -> mean (80 + 40 + 90) / 3 = 70; one unparsable
    m = pointwise_scores([80, 40, None, 90], ["a", "b", "a", "a"])
    assert m["mean"] == 70 and m["n"] == 4 and m["scored"] == 3 and m["unparsable"] == 1
    assert m["mean/a"] == 85 and m["n/a"] == 3 and m["mean/b"] == 40      # a: (80 + 90) / 2
    assert math.isnan(pointwise_scores([None])["mean"])


def test_pairwise_counts_only_order_consistent_verdicts():
    # (A first, B first): (1,2) A wins both times; (1,1) position bias -> inconsistent;
    # (tie,tie) tie; (2,1) B wins both times; (None,1) unparsable
    first, second = ["1", "1", "tie", "2", None], ["2", "1", "tie", "1", "1"]
    assert [pair_outcome(a, b) for a, b in zip(first, second)] == ["win", "inconsistent", "tie", "loss",
                                                                   "unparsable"]
    m = pairwise_results(first, second)
    assert m["consistent"] == 3 and m["inconsistent"] == 1 and m["unparsable"] == 1 and m["n"] == 5
    assert m["win_rate"] == pytest.approx(1 / 3) and m["tie_rate"] == pytest.approx(1 / 3)
    assert m["loss_rate"] == pytest.approx(1 / 3)
    assert pair_outcome("tie", "1") == "inconsistent"


def test_a_template_with_an_unknown_field_is_refused():
    check_template("Q: {question} A: {answer} {reference_line}")
    with pytest.raises(ConfigError, match="response"):
        check_template("Q: {question} A: {response}")
