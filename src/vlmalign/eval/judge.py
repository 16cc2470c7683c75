"""Judge-model evaluation: a local judge scores answers (pointwise) or compares two systems'
answers (pairwise, asked in both orders).

* pointwise (LLaVA-Critic's pointwise setting, Xiong et al., 2024: the judge sees the image, the
  question, the answer and optionally a reference, and gives a score): the score is the FIRST
  integer of the reply, clamped to [0, 100]; a reply without one is unparsable, counted and
  shown, never given a score. ``mean`` is over the parsed scores only.
* pairwise (LLaVA-Critic's pairwise setting; order swapping against position bias as in
  Zheng et al., 2023, "Judging LLM-as-a-Judge"): each item is judged with A's answer first and
  again with B's first; a verdict counts only when the two orders agree (A wins both times, B
  wins both times, or tie both times). Inconsistent and unparsable pairs are counted apart.
  Rates are over the consistent items.

The judge is a VLM adapter (images shown) or, for a text-only judge, a plain causal LM
(:class:`vlmalign.models.text_lm.TextLM`; the prompt then has no image). Prompts are batched and
the two orders of a pair sit in one batch, so a VLM judge encodes the image once per pair.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..config import check_template as config_check_template
from ..data.schema import Message
from .items import EvalItem

POINTWISE = (
    "You are a careful, impartial judge of answers to questions about an image.\n"
    "Question: {question}\n"
    "{reference_line}"
    "Answer to judge: {answer}\n"
    "Judge how correct, complete and faithful to the image the answer is. Begin your reply with one "
    "integer score from 0 (useless or wrong) to 100 (fully correct and helpful), then give a short reason.")
PAIRWISE = (
    "You are a careful, impartial judge comparing two answers to a question about an image.\n"
    "Question: {question}\n"
    "{reference_line}"
    "Answer 1: {answer_1}\n"
    "Answer 2: {answer_2}\n"
    "Which answer is more correct and helpful, judged against the image? Reply with exactly one of: "
    "1, 2, tie. Then give a short reason.")
FIELDS = ("question", "answer", "answer_1", "answer_2", "reference", "reference_line")

_INT = re.compile(r"-?\d+")
_VERDICT = re.compile(r"\b(tie|1|2)\b", re.IGNORECASE)


def check_template(template: str) -> None:
    config_check_template(template, FIELDS)


def parse_point_score(text: str) -> int | None:
    """The first integer of the reply, clamped to [0, 100]; None without one."""
    m = _INT.search(text)
    return None if m is None else max(0, min(100, int(m.group())))


def parse_verdict(text: str) -> str | None:
    """"1", "2" or "tie": the first of them in the reply (as a word); None without one."""
    m = _VERDICT.search(text)
    return None if m is None else m.group(1).lower()


def pointwise_scores(scores: Sequence[int | None], categories: Sequence[str | None] | None = None) -> dict:
    parsed = [s for s in scores if s is not None]
    out = {"mean": sum(parsed) / len(parsed) if parsed else float("nan"), "n": len(scores),
           "scored": len(parsed), "unparsable": len(scores) - len(parsed)}
    if categories is not None and all(c is not None for c in categories):
        for c in sorted(set(categories)):
            sub = [s for s, k in zip(scores, categories) if k == c and s is not None]
            out[f"mean/{c}"] = sum(sub) / len(sub) if sub else float("nan")
            out[f"n/{c}"] = sum(k == c for k in categories)
    return out


def pair_outcome(first: str | None, second: str | None) -> str:
    """One item's outcome from the verdicts with A first (``first``) and with B first (``second``):
    win / loss / tie (for A), ``inconsistent`` or ``unparsable``."""
    if first is None or second is None:
        return "unparsable"
    if first == "1" and second == "2":
        return "win"
    if first == "2" and second == "1":
        return "loss"
    if first == "tie" and second == "tie":
        return "tie"
    return "inconsistent"


def pairwise_results(first: Sequence[str | None], second: Sequence[str | None]) -> dict:
    if len(first) != len(second):
        raise ValueError(f"{len(first)} verdicts in one order but {len(second)} in the other")
    outcomes = [pair_outcome(a, b) for a, b in zip(first, second)]
    count = {k: outcomes.count(k) for k in ("win", "tie", "loss", "inconsistent", "unparsable")}
    consistent = count["win"] + count["tie"] + count["loss"]

    def rate(k):
        return count[k] / consistent if consistent else float("nan")
    return {"win_rate": rate("win"), "tie_rate": rate("tie"), "loss_rate": rate("loss"), "n": len(outcomes),
            "consistent": consistent, "wins": count["win"], "ties": count["tie"], "losses": count["loss"],
            "inconsistent": count["inconsistent"], "unparsable": count["unparsable"]}


def _fill(template: str, item: EvalItem, **answers) -> str:
    ref = item.answer if isinstance(item.answer, str) else ("; ".join(item.answer) if item.answer else None)
    return template.format(question=item.question, reference=ref or "",
                           reference_line=f"Reference answer: {ref}\n" if ref else "", **answers)


class Judge:
    """A judge model: a VLM adapter (``vision=True``) or a :class:`TextLM`."""

    def __init__(self, model, *, image_root=None, batch_size: int = 8, max_new_tokens: int = 32):
        self.model = model
        self.vision = hasattr(model, "encode_images")
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        if self.vision:
            from ..data.batching import ImageLoader
            self.loader = ImageLoader(model, image_root)

    @classmethod
    def load(cls, path: str, *, text_only: bool = False, trust_remote_code: bool = False, dtype=None, device=None,
             **kw) -> "Judge":
        if text_only:
            from ..models.text_lm import TextLM
            return cls(TextLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype,
                                              device=device), **kw)
        from ..models import load_adapter
        return cls(load_adapter(path, trust_remote_code=trust_remote_code, dtype=dtype, device=device), **kw)

    def ask(self, items: Sequence[EvalItem], texts: Sequence[str]) -> list[str]:
        """The judge's replies, greedy, batched in order (consecutive prompts share a batch)."""
        if not self.vision:
            return self.model.generate(list(texts), max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        from ..rollout.generate import SamplingConfig, generate
        prompts = [[Message.user(*it.images, t)] for it, t in zip(items, texts)]
        outs = generate(self.model, prompts, self.loader, SamplingConfig(max_new_tokens=self.max_new_tokens),
                        batch_size=self.batch_size)
        return [o[0] for o in outs]

    def pointwise(self, items: Sequence[EvalItem], answers: Sequence[str], template: str | None = None):
        """(per-item rows, metrics)."""
        tpl = template or POINTWISE
        check_template(tpl)
        texts = [_fill(tpl, it, answer=a) for it, a in zip(items, answers)]
        replies = self.ask(items, texts)
        scores = [parse_point_score(r) for r in replies]
        rows = [{"judge_prompt": t, "judge_reply": r, "score": s} for t, r, s in zip(texts, replies, scores)]
        cats = [it.category for it in items]
        return rows, pointwise_scores(scores, cats)

    def pairwise(self, items: Sequence[EvalItem], answers_a: Sequence[str], answers_b: Sequence[str],
                 template: str | None = None):
        """(per-item rows, metrics); A's answer first, then B's, for every item, side by side in
        the judge's batches."""
        tpl = template or PAIRWISE
        check_template(tpl)
        both_items, texts = [], []
        for it, a, b in zip(items, answers_a, answers_b):
            both_items += [it, it]
            texts += [_fill(tpl, it, answer_1=a, answer_2=b), _fill(tpl, it, answer_1=b, answer_2=a)]
        replies = self.ask(both_items, texts)
        first = [parse_verdict(r) for r in replies[0::2]]
        second = [parse_verdict(r) for r in replies[1::2]]
        rows = [{"judge_replies": [replies[2 * i], replies[2 * i + 1]], "verdicts": [first[i], second[i]],
                 "outcome": pair_outcome(first[i], second[i])} for i in range(len(items))]
        return rows, pairwise_results(first, second)
