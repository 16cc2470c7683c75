"""Generate answers for a VQA-style file and score them (exact match; POPE metrics)."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from ..data.batching import ImageLoader
from ..rollout.generate import SamplingConfig, generate
from .metrics import pope_metrics, vqa_accuracy


def evaluate_vqa(adapter, records: Sequence, loader: ImageLoader, *, max_new_tokens: int = 8,
                 batch_size: int = 32, prefix: str = "") -> tuple[dict, list[dict]]:
    """Greedy answers for RLPrompt records (reference = answer).

    Returns metrics (``vqa_accuracy`` overall and ``vqa_accuracy/<question_type>``) and one row
    per record with the prediction, for reports.
    """
    preds = [o[0] for o in generate(adapter, list(records), loader,
                                    SamplingConfig(max_new_tokens=max_new_tokens), batch_size=batch_size)]
    refs = [r.reference for r in records]
    metrics = {f"{prefix}vqa_accuracy": vqa_accuracy(preds, refs)}
    by_type = defaultdict(list)
    for r, p in zip(records, preds):
        by_type[r.meta.get("question_type", "all")].append((p, r.reference))
    if len(by_type) > 1:
        for t, pr in sorted(by_type.items()):
            metrics[f"{prefix}vqa_accuracy/{t}"] = vqa_accuracy([a for a, _ in pr], [b for _, b in pr])
    rows = [{"id": r.id, "question": r.prompt[-1].text, "reference": r.reference, "prediction": p}
            for r, p in zip(records, preds)]
    return metrics, rows


def evaluate_pope(adapter, records: Sequence, loader: ImageLoader, *, batch_size: int = 32) -> dict:
    preds = [o[0] for o in generate(adapter, list(records), loader, SamplingConfig(max_new_tokens=3),
                                    batch_size=batch_size)]
    labels = [r.meta.get("label", r.reference) for r in records]
    return pope_metrics(preds, labels)
