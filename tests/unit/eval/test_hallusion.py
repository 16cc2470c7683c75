import math

import pytest

from vlmalign.eval.hallusion import hallusion_scores, parse_hallusion_answer


@pytest.mark.parametrize("prediction, expected", [
    ("Yes, the left line is longer.", "yes"),
    ("No, it is not.", "no"),
    ("NO!", "no"),                  # "!" becomes a space
    ("The answer is yes.", "yes"),  # the final period is deleted
    ("No,there is none", "no"),     # a comma not touching a space becomes a space
    ("Not really", None),           # "not" is not "no"
    ("Yes and no", None),           # both words -> unknown
    ("yes/no", None),               # "/" -> space: both words again
    ("I don't know", None),
    ("A no-brainer: yes", None),    # "-" becomes a space, so "no" is a word too
])
def test_yes_no_extraction(prediction, expected):
    assert parse_hallusion_answer(prediction) == expected


def _rec(cat, sub, fig, q, answer, prediction):
    return {"category": cat, "subcategory": sub, "set_id": 0, "figure_id": fig, "question_id": q,
            "answer": answer, "prediction": prediction}


# set 1: VD/illusion, figures 0-1 x questions 0-1; set 2: VS/chart, figure 0 = no image
TOY = [
    _rec("VD", "illusion", 0, 0, "1", "Yes."),          # right
    _rec("VD", "illusion", 0, 1, "0", "No"),            # right
    _rec("VD", "illusion", 1, 0, "0", "Yes"),           # wrong
    _rec("VD", "illusion", 1, 1, "1", "yes, it is"),    # right
    _rec("VS", "chart", "0", "0", "No", "no"),          # right
    _rec("VS", "chart", "0", "1", "Yes", "Not sure"),   # unparsable -> wrong
    _rec("VS", "chart", "1", "0", "yes", "Yes"),        # right
    _rec("VS", "chart", "1", "1", "no", "No."),         # right
]


def test_aacc_facc_qacc_by_hand():
    m = hallusion_scores(TOY)
    # aAcc: 6 of 8 questions right
    assert m["aAcc"] == pytest.approx(6 / 8) and m["n"] == 8 and m["unparsable"] == 1
    # fAcc: figures VD/0 (2/2 right), VD/1 (1/2), VS/1 (2/2); VS/0 has no image -> left out: 2/3
    assert m["fAcc"] == pytest.approx(2 / 3) and m["figures"] == 3
    # qAcc: VD q0 (right on fig 0, wrong on fig 1) no; VD q1 yes; VS q0 yes; VS q1 no -> 2/4
    assert m["qAcc"] == pytest.approx(2 / 4) and m["question_groups"] == 4
    # per category: VD aAcc 3/4, fAcc 1/2, qAcc 1/2; VS aAcc 3/4, fAcc 1/1, qAcc 1/2
    assert (m["VD/aAcc"], m["VD/fAcc"], m["VD/qAcc"]) == pytest.approx((0.75, 0.5, 0.5))
    assert (m["VS/aAcc"], m["VS/fAcc"], m["VS/qAcc"]) == pytest.approx((0.75, 1.0, 0.5))
    assert m["VS/unparsable"] == 1 and m["VD/unparsable"] == 0


def test_options_vlmevalkit_figures_and_official_uncertain_rule():
    # keeping VS figure 0 as a figure (VLMEvalKit): its questions are right + unparsable -> 2/4
    m = hallusion_scores(TOY, exclude_vs_no_figure=False)
    assert m["fAcc"] == pytest.approx(2 / 4) and m["figures"] == 4
    # the official "uncertain counts as right without an image": VS (0, 1) becomes right:
    # aAcc 7/8, qAcc 3/4 (VS q1 now right on both), fAcc unchanged (figure 0 excluded)
    m = hallusion_scores(TOY, unparsable_right_without_figure=True)
    assert m["aAcc"] == pytest.approx(7 / 8) and m["qAcc"] == pytest.approx(3 / 4)
    assert m["fAcc"] == pytest.approx(2 / 3) and m["unparsable"] == 1


def test_parsed_field_and_bad_input():
    recs = [dict(r) for r in TOY[:2]]
    recs[0].pop("prediction")
    recs[0]["parsed"] = None
    m = hallusion_scores(recs)
    assert m["aAcc"] == pytest.approx(1 / 2) and m["unparsable"] == 1
    assert "VS/aAcc" not in m                  # a category with no records is left out
    with pytest.raises(ValueError, match=r"item 1: fields category/subcategory/set_id"):
        hallusion_scores([TOY[0], dict(TOY[0])])
    with pytest.raises(ValueError, match=r"item 0: field 'category'"):
        hallusion_scores([{**TOY[0], "category": "VX"}])
    with pytest.raises(ValueError, match=r"item 0: field 'answer'"):
        hallusion_scores([{**TOY[0], "answer": "maybe"}])
    with pytest.raises(ValueError, match=r"item 0: missing field 'figure_id'"):
        hallusion_scores([{k: v for k, v in TOY[0].items() if k != "figure_id"}])
    empty = hallusion_scores([])
    assert math.isnan(empty["aAcc"]) and math.isnan(empty["qAcc"]) and empty["n"] == 0
