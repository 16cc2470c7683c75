"""HallusionBench scoring (Guan et al., CVPR 2024, "HallusionBench: An Advanced Diagnostic Suite for
Entangled Language Hallucination and Visual Illusion in Large Vision-Language Models").

* answer parsing (``parse_hallusion_answer``): the official ``evaluation.py`` of
  tianyi-lab/HallusionBench asks GPT-4 to judge each answer correct / wrong / uncertain; there is
  no rule-based parser there. VLMEvalKit's HallusionBench (``vlmeval/dataset/image_yorn.py`` with
  ``YOrN_Extraction`` in ``vlmeval/dataset/utils/yorn.py``; its exact-matching mode, no LLM judge)
  is the rule used here: lower-case, VLMEvalKit's ``process_punctuation`` (each of
  ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` deleted when it touches a space in the text or the
  text has a digit,digit comma, else replaced by a space; then periods not between digits deleted,
  at most 32 of them as the original's ``re.UNICODE``-as-count), split on whitespace; "yes" among
  the words and "no" not -> yes, "no" and not "yes" -> no, otherwise ``None`` (unparsable, wrong).
  So "Not really" is unparsable ("not" is not "no") and "Yes and no" too.
* metrics, as ``utils.py`` of the official repository (``get_eval_all``, ``get_eval_fig``,
  ``get_eval_pair_all``), as fractions rather than the script's percentages:
  aAcc = right questions / questions; fAcc = figures with every question right / figures, a
  figure being (category, subcategory, set_id, figure_id); qAcc = question groups right on every
  figure / question groups, a group being (category, subcategory, set_id, question_id). Reported
  overall and per category (VD = visual dependent, VS = visual supplement).
* official details kept by default: a VS question with ``figure_id`` 0 is asked without any image,
  so ``get_eval_fig`` leaves those out of fAcc (``exclude_vs_no_figure=True``); VLMEvalKit's
  ``Hallusion_rating`` keeps them and keys figures and question groups by l2-category (the
  subcategory), set_id and figure_id / question_id without the category. The official script also
  counts "uncertain" as right for those no-image VS questions; with a yes/no parser the nearest
  thing is an unparsable answer, which is right there only with
  ``unparsable_right_without_figure=True`` (off by default, as in VLMEvalKit).
* a (category, subcategory, set_id, figure_id, question_id) must be unique (the script asserts it).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Mapping, Sequence

from ._common import field, ratio

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_ANSWERS = {"yes": "yes", "no": "no", "1": "yes", "0": "no"}


def _process_punctuation(text: str) -> str:
    from .vqa_soft import process_punctuation
    return process_punctuation(text, _PUNCT, _PERIOD)


def parse_hallusion_answer(prediction: str) -> str | None:
    """'yes' / 'no' by VLMEvalKit's YOrN_Extraction, or None when neither (or both) is said."""
    words = _process_punctuation(prediction.lower()).split()
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "yes"
    if has_no and not has_yes:
        return "no"
    return None


def _acc(groups: Mapping[tuple, list[bool]]) -> float:
    return ratio(sum(all(v) for v in groups.values()), len(groups))


def _metrics(rows: Sequence[dict], prefix: str, exclude_vs_no_figure: bool) -> dict[str, float]:
    figs: dict[tuple, list[bool]] = defaultdict(list)
    qs: dict[tuple, list[bool]] = defaultdict(list)
    for r in rows:
        if not (exclude_vs_no_figure and r["category"] == "VS" and r["figure_id"] == "0"):
            figs[(r["category"], r["subcategory"], r["set_id"], r["figure_id"])].append(r["ok"])
        qs[(r["category"], r["subcategory"], r["set_id"], r["question_id"])].append(r["ok"])
    n = len(rows)
    return {f"{prefix}aAcc": ratio(sum(r["ok"] for r in rows), n), f"{prefix}fAcc": _acc(figs),
            f"{prefix}qAcc": _acc(qs), f"{prefix}n": n, f"{prefix}figures": len(figs),
            f"{prefix}question_groups": len(qs),
            f"{prefix}unparsable": sum(r["parsed"] is None for r in rows)}


def hallusion_scores(records: Sequence[Mapping], *, exclude_vs_no_figure: bool = True,
                     unparsable_right_without_figure: bool = False) -> dict[str, float]:
    """HallusionBench aAcc / fAcc / qAcc overall and per category.

    Each record: ``category`` ("VD" or "VS"), ``subcategory``, ``set_id``, ``figure_id``,
    ``question_id`` (ids compared as strings, so 0 and "0" agree), ``answer`` (yes/no in any case,
    or the dataset's ``gt_answer`` "1"/"0"), and ``prediction`` (raw text, parsed here) or
    ``parsed`` ("yes"/"no"/None from another parser). Returns ``aAcc``, ``fAcc``, ``qAcc``, ``n``
    (questions), ``figures``, ``question_groups``, ``unparsable`` and the same under ``VD/`` and
    ``VS/``.
    """
    rows, seen = [], {}
    for i, rec in enumerate(records):
        cat = field(rec, i, "category")
        if cat not in ("VD", "VS"):
            raise ValueError(f"item {i}: field 'category' must be 'VD' or 'VS', got {cat!r}")
        ids = {k: str(field(rec, i, k)).strip()
               for k in ("subcategory", "set_id", "figure_id", "question_id")}
        key = (cat, ids["subcategory"], ids["set_id"], ids["figure_id"], ids["question_id"])
        if key in seen:
            raise ValueError(f"item {i}: fields category/subcategory/set_id/figure_id/question_id "
                             f"{key} repeat item {seen[key]}")
        seen[key] = i
        gold = _ANSWERS.get(str(field(rec, i, "answer")).strip().lower())
        if gold is None:
            raise ValueError(f"item {i}: field 'answer' must be yes/no or 1/0, "
                             f"got {rec['answer']!r}")
        if "parsed" in rec:
            parsed = rec["parsed"]
            if parsed is not None and str(parsed).strip().lower() not in ("yes", "no"):
                raise ValueError(f"item {i}: field 'parsed' must be 'yes', 'no' or None")
            parsed = None if parsed is None else str(parsed).strip().lower()
        else:
            pred = field(rec, i, "prediction")
            if not isinstance(pred, str):
                raise ValueError(f"item {i}: field 'prediction' must be a string")
            parsed = parse_hallusion_answer(pred)
        ok = parsed == gold
        if (parsed is None and unparsable_right_without_figure and cat == "VS"
                and ids["figure_id"] == "0"):
            ok = True
        rows.append({"category": cat, **ids, "parsed": parsed, "ok": ok})
    out = _metrics(rows, "", exclude_vs_no_figure)
    for cat in ("VD", "VS"):
        sub = [r for r in rows if r["category"] == cat]
        if sub:
            out.update(_metrics(sub, f"{cat}/", exclude_vs_no_figure))
    return out
