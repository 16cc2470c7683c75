"""Multiple-choice scoring: answer extraction, grouped accuracy, and MMBench CircularEval.

* CircularEval (Liu et al., 2023, "MMBench: Is Your Multi-modal Model an All-around Player?",
  Sec. 3.1; VLMEvalKit ``vlmeval/dataset/utils/multiple_choice.py``, ``mcq_circular_eval``): each
  question is asked once per circular shift of its options (copies share ``index % 1e6`` in
  VLMEvalKit; here they share a ``question_id``); the question counts as right only if *every*
  copy is answered right. Overall and per-category accuracy are means over questions.
* Plain accuracy per group: SEED-Bench (Li et al., 2023) reports accuracy per evaluation dimension
  and ScienceQA (Lu et al., 2022) per subject / context modality / grade: correct / questions in
  the group. An unparsable answer is wrong and is counted in ``unparsable``.
* ``extract_choice`` maps free text to an option letter, in the spirit of VLMEvalKit's exact-match
  stage (``can_infer_option`` then ``can_infer_text``), without its LLM fallback. Rules in order:
  1. an explicit "answer is X" / "answer: X" with X a valid letter;
  2. the text (stripped of brackets/punctuation) is a valid letter, or starts with a valid letter
     followed by ")", "." or ":" (e.g. "B) cat", "(C)");
  3. exactly one valid letter appears as a standalone upper-case token ("A"/"I" followed by a
     lower-case word other than or/and are read as English words, not options); two different letters -> None;
  4. exactly one option's text occurs in the answer (case-insensitive; longer option texts that
     contain a shorter matched one win, e.g. "red car" over "car");
  otherwise ``None`` (ambiguous or absent), which callers count as unparsable, never drop.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Mapping, Sequence

from ._common import check_same_length, field

_ANSWER_IS = re.compile(r"\banswer\s*(?:is|:)?\s*[:\-]?\s*\(?([A-Za-z])\)?(?![A-Za-z])",
                        re.IGNORECASE)
_LEADING = re.compile(r"^\s*[\(\[]?([A-Za-z])(?:[\)\]\.:]|$)")
# a standalone capital letter, except "A"/"I" used as a word ("A cat ...", "I think ...")
_STANDALONE = re.compile(r"(?<![A-Za-z])(?!(?:A|I)\s+(?!(?:or|and)\b)[a-z])([A-Z])(?![A-Za-z])")


def extract_choice(text: str, options: Mapping[str, str] | Sequence[str]) -> str | None:
    """Option letter named by ``text`` or None. ``options``: {"A": "cat", ...} or ["cat", ...]
    (letters A, B, ... in order)."""
    if not isinstance(options, Mapping):
        options = {chr(ord("A") + k): o for k, o in enumerate(options)}
    letters = {str(k).upper() for k in options}
    stripped = text.strip()
    m = _ANSWER_IS.search(stripped)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    m = _LEADING.match(stripped)
    if m and m.group(1).upper() in letters and (len(stripped) <= 4 or m.group(1).isupper()):
        return m.group(1).upper()
    found = {m.group(1) for m in _STANDALONE.finditer(stripped) if m.group(1) in letters}
    if len(found) == 1:
        return found.pop()
    if found:
        return None
    low = stripped.lower()
    hits = {str(k).upper(): str(v).strip().lower() for k, v in options.items()
            if str(v).strip() and str(v).strip().lower() in low}
    hits = {k: v for k, v in hits.items()
            if not any(v != w and v in w for w in hits.values())}
    return hits.popitem()[0] if len(hits) == 1 else None


def grouped_accuracy(predictions: Sequence[str | None], answers: Sequence[str],
                     groups: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy of extracted letters (None = unparsable, counted wrong) overall and per group.

    Returns ``accuracy``, ``n``, ``unparsable`` and, with ``groups``, ``accuracy/<g>``,
    ``n/<g>``, ``unparsable/<g>``.
    """
    check_same_length(predictions=predictions, answers=answers, groups=groups)
    rows = []
    for i, (p, a) in enumerate(zip(predictions, answers)):
        if a is None or not str(a).strip():
            raise ValueError(f"item {i}: missing field 'answer'")
        if p is not None and not isinstance(p, str):
            raise ValueError(f"item {i}: field 'prediction' must be a string or None")
        g = "all" if groups is None else groups[i]
        if g is None:
            raise ValueError(f"item {i}: missing field 'group'")
        rows.append((str(g), p is None, p is not None and p.strip().upper() == str(a).strip().upper()))
    out = _summ(rows, "")
    if groups is not None:
        by = defaultdict(list)
        for r in rows:
            by[r[0]].append(r)
        for g, rs in sorted(by.items()):
            out.update(_summ(rs, f"/{g}"))
    return out


def _summ(rows, suffix: str) -> dict[str, float]:
    n = len(rows)
    return {f"accuracy{suffix}": sum(r[2] for r in rows) / n if n else float("nan"),
            f"n{suffix}": n, f"unparsable{suffix}": sum(r[1] for r in rows)}


def circular_eval(records: Sequence[Mapping]) -> dict[str, float]:
    """MMBench CircularEval from one record per (question, rotation).

    Each record: ``question_id`` (shared by the rotations of a question), ``prediction`` (an
    extracted letter or None = unparsable), ``answer`` (the right letter *for that rotation*),
    optional ``category``. Returns ``accuracy`` (questions with every rotation right / questions),
    ``n`` (questions), ``n_records``, ``unparsable`` (records), ``vanilla_accuracy`` (share of
    records right, for comparison) and ``accuracy/<category>``, ``n/<category>``.
    """
    by_q: dict[str, list[bool]] = defaultdict(list)
    cat: dict[str, str] = {}
    unparsable = 0
    for i, rec in enumerate(records):
        qid = str(field(rec, i, "question_id"))
        ans = str(field(rec, i, "answer")).strip().upper()
        pred = rec.get("prediction")
        if pred is not None and not isinstance(pred, str):
            raise ValueError(f"item {i}: field 'prediction' must be a string or None")
        unparsable += pred is None
        c = rec.get("category")
        if c is not None:
            if qid in cat and cat[qid] != str(c):
                raise ValueError(f"item {i}: field 'category' {c!r} differs from earlier "
                                 f"rotations of question {qid!r} ({cat[qid]!r})")
            cat[qid] = str(c)
        by_q[qid].append(pred is not None and pred.strip().upper() == ans)
    hit = {q: all(oks) for q, oks in by_q.items()}
    n = len(hit)
    n_rec = sum(len(v) for v in by_q.values())
    out: dict[str, float] = {
        "accuracy": sum(hit.values()) / n if n else float("nan"), "n": n, "n_records": n_rec,
        "unparsable": unparsable,
        "vanilla_accuracy": sum(sum(v) for v in by_q.values()) / n_rec if n_rec else float("nan")}
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for q, h in hit.items():
        if q in cat:
            by_cat[cat[q]].append(h)
    for c, hs in sorted(by_cat.items()):
        out[f"accuracy/{c}"] = sum(hs) / len(hs)
        out[f"n/{c}"] = len(hs)
    return out
