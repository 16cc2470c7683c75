"""Scorers: VQA exact-match accuracy and POPE-style yes/no metrics."""

from __future__ import annotations

from typing import Sequence

from ..data.synthetic.verify import answer_matches, normalize_answer


def vqa_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to the reference after answer normalisation."""
    if not predictions:
        return float("nan")
    return sum(answer_matches(p, r) for p, r in zip(predictions, references)) / len(predictions)


def yes_no(answer: str) -> str | None:
    """'yes' / 'no' when the answer starts with one, else None (counts as wrong)."""
    words = normalize_answer(answer).split()
    if words and words[0] in ("yes", "no"):
        return words[0]
    return None


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE (Li et al., 2023) metrics with "yes" as the positive class.

    accuracy = (TP + TN) / N; precision = TP / (TP + FP); recall = TP / (TP + FN);
    f1 = 2PR / (P + R); yes_ratio = share of answers that are "yes" (a model that hallucinates
    answers yes too often). Answers that are neither yes nor no count as wrong and as not-yes.
    """
    tp = fp = tn = fn = yes = 0
    for p, lab in zip(predictions, labels):
        a, lab = yes_no(p), normalize_answer(lab)
        yes += a == "yes"
        if lab == "yes":
            tp += a == "yes"
            fn += a != "yes"
        else:
            tn += a == "no"
            fp += a == "yes"
    n = len(predictions)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"pope_accuracy": (tp + tn) / n if n else float("nan"), "pope_precision": prec,
            "pope_recall": rec, "pope_f1": f1, "pope_yes_ratio": yes / n if n else float("nan")}
