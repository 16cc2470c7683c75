"""POPE scoring per split (Li et al., 2023, "Evaluating Object Hallucination in Large
Vision-Language Models", EMNLP).

Follows the official ``evaluate.py`` of AoiDragon/POPE:

* answer parsing: keep the text before the first ``"."``, delete ``","``, split on single spaces;
  if any word is exactly ``"No"``, ``"not"`` or ``"no"`` the answer is *no*, otherwise it is *yes*.
  There is no "unparsable" bucket: anything without those words (including "NO", "Nope", "") counts
  as yes. ``defaulted_yes`` counts the answers parsed as yes whose first word is not "yes"
  (case-insensitive), so a caller can see how many answers got yes only by that default.
* yes is the positive class: accuracy = (TP+TN)/N, precision = TP/(TP+FP), recall = TP/(TP+FN),
  F1 = 2PR/(P+R), yes_ratio = predicted yes / N. A zero denominator gives NaN (the script would
  raise ZeroDivisionError).

``metrics.pope_metrics`` (the quickstart's) is a different, stricter parser kept unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from ._common import check_same_length, ratio

NO_WORDS = ("No", "not", "no")


def parse_pope_answer(answer: str) -> str:
    """'yes' or 'no' by the official POPE rule (see module docstring)."""
    first = answer.split(".")[0] if "." in answer else answer
    words = first.replace(",", "").split(" ")
    return "no" if any(w in NO_WORDS for w in words) else "yes"


def _binary(preds: list[str], labels: list[str]) -> dict[str, float]:
    tp = sum(p == "yes" and lab == "yes" for p, lab in zip(preds, labels))
    fp = sum(p == "yes" and lab == "no" for p, lab in zip(preds, labels))
    tn = sum(p == "no" and lab == "no" for p, lab in zip(preds, labels))
    fn = sum(p == "no" and lab == "yes" for p, lab in zip(preds, labels))
    n = len(preds)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * precision * recall, precision + recall)
    return {"accuracy": ratio(tp + tn, n), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": ratio(tp + fp, n), "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def pope_scores(predictions: Sequence[str], labels: Sequence[str],
                splits: Sequence[str] | None = None) -> dict[str, float]:
    """POPE metrics overall and, with ``splits`` (e.g. random/popular/adversarial), per split.

    Keys: ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio``, ``n``, ``tp``, ``fp``,
    ``tn``, ``fn`` for all items pooled, ``defaulted_yes`` (answers parsed as yes whose first word is
    not "yes", i.e. that took the script's yes default), and ``<split>/<metric>`` per split.
    Labels must be "yes"/"no" (case and surrounding space ignored).
    """
    check_same_length(predictions=predictions, labels=labels, splits=splits)
    preds, labs = [], []
    defaulted = 0
    for i, (p, lab) in enumerate(zip(predictions, labels)):
        if not isinstance(p, str):
            raise ValueError(f"item {i}: field 'prediction' must be a string")
        lab = str(lab).strip().lower()
        if lab not in ("yes", "no"):
            raise ValueError(f"item {i}: field 'label' must be yes/no, got {lab!r}")
        parsed = parse_pope_answer(p)
        words = p.strip().lower().replace(",", " ").replace(".", " ").split()
        defaulted += parsed == "yes" and (not words or words[0] != "yes")
        preds.append(parsed)
        labs.append(lab)
    out = _binary(preds, labs)
    out["defaulted_yes"] = defaulted
    if splits is not None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(splits):
            if s is None:
                raise ValueError(f"item {i}: missing field 'split'")
            groups[str(s)].append(i)
        for s, idx in sorted(groups.items()):
            for k, v in _binary([preds[i] for i in idx], [labs[i] for i in idx]).items():
                out[f"{s}/{k}"] = v
    return out
