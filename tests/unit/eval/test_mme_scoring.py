import math

import pytest

from vlmalign.eval.mme import COGNITION, PERCEPTION, mme_scores, parse_mme_answer


def _rec(task, image, label, pred):
    return {"subtask": task, "image": image, "label": label, "prediction": pred}


def test_parse_follows_official_prefix_rule():
    assert parse_mme_answer("Yes") == "yes"
    assert parse_mme_answer("No, there is none.") == "no"
    assert parse_mme_answer("Not sure") == "no"       # "not " contains "no"
    assert parse_mme_answer("There is a dog") == "other"  # "ther" has neither
    assert parse_mme_answer("I think yes") == "other"  # only the first 4 characters count
    assert parse_mme_answer(" yes") == "yes"           # " yes"[:4] still holds "yes"


def test_acc_plus_differs_from_acc_and_score_sums_both():
    recs = [
        # existence: image a both right, image b one right (one wrong), image c both right
        _rec("existence", "a", "yes", "Yes"), _rec("existence", "a", "no", "No"),
        _rec("existence", "b", "yes", "yes"), _rec("existence", "b", "no", "yes"),
        _rec("existence", "c", "yes", "Yes."), _rec("existence", "c", "no", "no"),
        # code_reasoning: image d one right + one "other"; image e both right
        _rec("code_reasoning", "d", "yes", "yes"), _rec("code_reasoning", "d", "no", "The code"),
        _rec("code_reasoning", "e", "yes", "yes"), _rec("code_reasoning", "e", "no", "no"),
    ]
    m = mme_scores(recs)
    # existence: acc = 5/6 questions, acc+ = 2/3 images -> score = 100*5/6 + 100*2/3 = 150
    assert m["existence/acc"] == pytest.approx(5 / 6)
    assert m["existence/acc_plus"] == pytest.approx(2 / 3)
    assert m["existence/score"] == pytest.approx(150.0)
    # code_reasoning: acc = 3/4, acc+ = 1/2 -> 75 + 50 = 125; one "other"
    assert m["code_reasoning/score"] == pytest.approx(125.0)
    assert m["code_reasoning/other"] == 1 and m["other"] == 1
    assert m["perception"] == pytest.approx(150.0)
    assert m["cognition"] == pytest.approx(125.0)
    assert m["total"] == pytest.approx(275.0)
    assert m["perception_subtasks"] == 1 and m["cognition_subtasks"] == 1 and m["n"] == 10


def test_official_subtask_split():
    assert len(PERCEPTION) == 10 and len(COGNITION) == 4
    assert "OCR" in PERCEPTION and "text_translation" in COGNITION


def test_bad_input_names_item_and_field():
    with pytest.raises(ValueError, match=r"item 1: missing field 'prediction'"):
        mme_scores([_rec("count", "a", "yes", "yes"), {"subtask": "count", "image": "a", "label": "no"}])
    with pytest.raises(ValueError, match=r"item 0: field 'subtask'"):
        mme_scores([_rec("counting", "a", "yes", "yes")])
    with pytest.raises(ValueError, match=r"item 0: field 'label'"):
        mme_scores([_rec("count", "a", "maybe", "yes")])
    with pytest.raises(ValueError, match=r"item 2: field 'image'"):  # image b has 1 question
        mme_scores([_rec("count", "a", "yes", "yes"), _rec("count", "a", "no", "no"),
                    _rec("count", "b", "yes", "yes")])
    assert not math.isnan(mme_scores([])["total"])
