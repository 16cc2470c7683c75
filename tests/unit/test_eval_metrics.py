from vlmalign.eval.metrics import pope_metrics, vqa_accuracy, yes_no


def test_vqa_accuracy_normalises():
    assert vqa_accuracy(["Red.", "two", "top-left", "blue"], ["red", "2", "top left", "green"]) == 0.75


def test_pope_metrics_hand_computed():
    preds = ["yes", "Yes.", "no", "no", "yes", "maybe"]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    # TP=2 (0,1), FN=1 (2), TN=1 (3), FP=1 (4), "maybe" on a "no": wrong, not yes
    m = pope_metrics(preds, labels)
    assert m["pope_accuracy"] == 3 / 6
    assert m["pope_precision"] == 2 / 3
    assert m["pope_recall"] == 2 / 3
    assert abs(m["pope_f1"] - 2 / 3) < 1e-12
    assert m["pope_yes_ratio"] == 3 / 6
    assert yes_no("No, there is not") == "no" and yes_no("perhaps") is None


def test_a_lone_article_is_an_answer_so_letter_a_matches():
    from vlmalign.eval.metrics import vqa_accuracy
    # multiple-choice letters: "A" must match "A" (articles are dropped only beside other words)
    assert vqa_accuracy(["A", "(a)", "B", "a circle"], ["A", "A", "A", "circle"]) == 0.75
