"""MMMU and MMStar scoring.

MMMU (Yue et al., CVPR 2024, "MMMU: A Massive Multi-discipline Multimodal Understanding and
Reasoning Benchmark for Expert AGI"). Rules of the official ``mmmu/utils/eval_utils.py`` of
MMMU-Benchmark/MMMU (``parse_multi_choice_response``, ``parse_open_response``, ``eval_open``,
``normalize_str``, ``extract_numbers``), re-implemented here:

* multiple choice (``parse_mmmu_choice``): strip the characters ``, . ! ? ; : '`` from both ends,
  one after the other in that order (``str.strip(c)`` per character, so "A,." keeps its comma),
  then pad with a space on each side. Candidates, first rule that finds any:
  1. a bracketed letter "(A)" anywhere;
  2. a letter between spaces " A ";
  3. only when the padded response has more than 5 whitespace-separated words: an option whose
     text occurs in the response (case-insensitive).
  Several candidates: the one whose match (rule 1: "(X)", rule 2: " X ", rule 3: the option text)
  starts last in the response; equal starts go to the earlier option. None found: the official
  script picks a random option (``random.seed(42)`` once at import). **Deviation**: here the
  answer is ``None`` and counted as unparsable (wrong); ``random_fallback=True`` restores the
  random pick (from ``random.Random(rng_seed)``; the draws are not those of the official run,
  which depend on the order of all its calls).
* open questions (``parse_mmmu_open``): strip, strip "." from both ends, lower-case; split into
  sub-responses on newlines (the script's sentence split ``\\.\\s(?=[A-Z])`` runs after
  lower-casing and so never fires; reproduced). In each sub-response, for each key indicator
  "could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result " (plus "=" in
  the last sub-response) present, take the text after its last occurrence, stripped, and keep
  the shortest (an empty tail is replaced by the next indicator's, as in the script); keep it if
  non-empty and not a lone punctuation mark. No key response at all: the whole response is the
  key response. Predictions = key responses plus every number found in them (numbers with
  thousands commas, scientific notation, plain decimals/integers), each normalised:
  ``normalize_mmmu_str`` turns anything ``float()`` accepts after deleting commas into that float
  rounded to 2 decimals, else lower-cases it, and a one-character string becomes the two
  strings " x" and "x " (so it only matches as a separate word). Duplicates removed (kept in first
  order; the script uses a set).
* ``mmmu_open_correct``: right if a parsed float equals a normalised gold float, or a normalised
  gold string is a substring of a parsed string. Multiple choice is right when the parsed letter
  equals the gold letter (or one of a list of gold letters).
* ``mmmu_scores``: accuracy = right / questions, overall, per subject and per discipline
  (instance-level, as ``calculate_ins_level_acc``; ``Overall-<discipline>`` as ``main_eval_only.py``
  prints it).

MMStar (Chen et al., NeurIPS 2024, "Are We on the Right Way for Evaluating Large Vision-Language
Models?"; ``eval/vlmeval/evaluate/mmstar.py`` of MMStar-Benchmark/MMStar):

* answer rule (``parse_mmstar_answer``): prediction lower-cased, stripped, newlines -> spaces; it
  names option x when its first character is x, or it starts with "(" and its second character
  is x, or it starts with "option " / "the answer is " and the next character is x. As the
  letters A-D are never "(", "o" or "t", this is one letter per prediction; one that is not an
  option letter is ``None`` (unparsable, wrong: the official rule cannot match it either).
  VLMEvalKit's MMStar instead uses its generic multiple-choice extraction (``can_infer`` then an
  optional LLM judge); pass such a result as ``parsed`` (e.g. from ``multiple_choice.extract_choice``).
* ``mmstar_scores``: accuracy overall, per category (6) and per l2 category (18). The official
  script divides by the fixed counts 1500 / 250; here by the questions present (the same on the
  full benchmark).
* ``mmstar_gain``: multi-modal gain MG = S_v - S_wv and multi-modal leakage
  ML = max(0, S_wv - S_t) (``eval/README.md``), from the LVLM's score with images (S_v), without
  images (S_wv) and its LLM base's text-only score (S_t): three separate runs of ``mmstar_scores``.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Any, Mapping, Sequence

from ._common import field, ratio

DISCIPLINES: dict[str, tuple[str, ...]] = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine",
                            "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science",
                             "Electronics", "Energy_and_Power", "Materials",
                             "Mechanical_Engineering"),
}
SUBJECT_TO_DISCIPLINE = {s: d for d, subs in DISCIPLINES.items() for s in subs}

_EDGE_CHARS = (",", ".", "!", "?", ";", ":", "'")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ",
                   "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}
# numbers with thousands separators, scientific notation, plain numbers (not part of either)
_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_PLAIN = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def _letters_and_texts(options: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    if isinstance(options, Mapping):
        return {str(k): str(v) for k, v in options.items()}
    return {chr(ord("A") + k): str(o) for k, o in enumerate(options)}


def parse_mmmu_choice(response: str, options: Mapping[str, str] | Sequence[str], *,
                      random_fallback: bool = False,
                      rng_seed: int | random.Random | None = None) -> str | None:
    """Option letter by MMMU's ``parse_multi_choice_response`` rules, or None when none applies.

    ``options``: a list of option texts (letters A, B, ... in order, as MMMU's
    ``get_multi_choice_info``) or a {letter: text} dict. ``random_fallback=True``: pick a random
    letter instead of None, as the official script does (``rng_seed``: an int or a shared
    ``random.Random``).
    """
    index2ans = _letters_and_texts(options)
    letters = list(index2ans)
    text = response
    for c in _EDGE_CHARS:
        text = text.strip(c)
    text = f" {text} "
    cands = [c for c in letters if f"({c})" in text]
    if cands:
        starts = {c: text.rfind(f"({c})") for c in cands}
    else:
        cands = [c for c in letters if f" {c} " in text]
        starts = {c: text.rfind(f" {c} ") for c in cands}
        if not cands and len(text.split()) > 5:
            low = text.lower()
            cands = [c for c in letters if index2ans[c].lower() in low]
            starts = {c: low.rfind(index2ans[c].lower()) for c in cands}
    if not cands:
        if not random_fallback or not letters:
            return None
        rng = rng_seed if isinstance(rng_seed, random.Random) else random.Random(rng_seed)
        return rng.choice(letters)
    # the last-starting match; max() keeps the earliest option on equal starts
    return max(cands, key=lambda c: starts[c])


def normalize_mmmu_str(text: str) -> list[float | str]:
    """MMMU's ``normalize_str``: a number -> [float rounded to 2 places]; else lower-cased, and a
    single character x -> [" x", "x "]."""
    s = text.strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        pass
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


def extract_mmmu_numbers(text: str) -> list[str]:
    """MMMU's ``extract_numbers``: comma-grouped, then scientific, then plain numbers."""
    return _NUM_COMMAS.findall(text) + _NUM_SCI.findall(text) + _NUM_PLAIN.findall(text)


def _key_responses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # the official split r"\.\s(?=[A-Z])|\n" runs on lower-cased text: only "\n" can split
    subs = response.split("\n")
    keys = []
    for k, sub in enumerate(subs):
        indicators = _KEY_INDICATORS + (("=",) if k == len(subs) - 1 else ())
        shortest = None
        for ind in indicators:
            if ind in sub:
                tail = sub.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_mmmu_open(response: str) -> list[float | str]:
    """MMMU's ``parse_open_response``: normalised key responses and the numbers in them."""
    keys = _key_responses(response)
    raw = keys + [num for key in keys for num in extract_mmmu_numbers(key)]
    out: list[float | str] = []
    for r in raw:
        for v in normalize_mmmu_str(r):
            if v not in out:
                out.append(v)
    return out


def mmmu_open_correct(parsed: Sequence[float | str], answers: str | Sequence[str]) -> bool:
    """MMMU's ``eval_open``: a parsed float equal to a normalised gold float, or a normalised gold
    string contained in a parsed string."""
    golds = [answers] if isinstance(answers, str) else list(answers)
    norm = [v for g in golds for v in normalize_mmmu_str(str(g))]
    for p in parsed:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in norm):
                return True
        elif any(not isinstance(g, str) and g == p for g in norm):
            return True
    return False


def _subject(rec: Mapping, i: int) -> str | None:
    subj = rec.get("subject")
    if subj is None and rec.get("id") is not None:
        parts = str(rec["id"]).split("_")  # "validation_Art_Theory_12" -> "Art_Theory"
        subj = "_".join(parts[1:-1]) if len(parts) >= 3 else None
    if subj is not None and subj not in SUBJECT_TO_DISCIPLINE:
        raise ValueError(f"item {i}: field 'subject' is {subj!r}, not an MMMU subject")
    return subj


def mmmu_scores(records: Sequence[Mapping], *, random_fallback: bool = False,
                rng_seed: int | None = None) -> dict[str, float]:
    """MMMU accuracy overall, per subject and per discipline.

    Each record: ``question_type`` ("multiple-choice" or "open"), ``answer`` (the gold letter /
    text, or a list of them), ``response`` (raw model text, parsed here; multiple choice also needs
    ``options``, a list or {letter: text}) or ``parsed`` (already parsed: a letter or None, or for
    open questions a list as from ``parse_mmmu_open``), and ``subject`` (one of the 30, e.g.
    "Art_Theory") or an official ``id`` such as "validation_Art_Theory_12" to derive it from.
    Returns ``accuracy``, ``n``, ``correct``, ``unparsable`` (multiple-choice answers no rule
    could read; wrong unless ``random_fallback``), ``n_multiple_choice``, ``n_open``, and per
    subject / per discipline ``<name>/accuracy``, ``<name>/n``, ``<name>/unparsable`` with
    ``<name>`` the subject or ``Overall-<discipline>``.
    """
    rng = random.Random(rng_seed)
    rows: list[tuple[str | None, bool, bool]] = []
    n_mc = 0
    for i, rec in enumerate(records):
        qtype = field(rec, i, "question_type")
        answer = field(rec, i, "answer")
        subj = _subject(rec, i)
        if qtype == "multiple-choice":
            n_mc += 1
            if "parsed" in rec:
                pred = rec["parsed"]
                if pred is not None and not isinstance(pred, str):
                    raise ValueError(f"item {i}: field 'parsed' must be a letter or None")
                unparsable = pred is None
            else:
                response = field(rec, i, "response")
                if not isinstance(response, str):
                    raise ValueError(f"item {i}: field 'response' must be a string")
                options = field(rec, i, "options")
                pred = parse_mmmu_choice(response, options)
                unparsable = pred is None
                if unparsable and random_fallback:
                    pred = parse_mmmu_choice(response, options, random_fallback=True,
                                             rng_seed=rng)
            golds = [answer] if isinstance(answer, str) else list(answer)
            ok = pred is not None and any(pred == str(g) for g in golds)
        elif qtype == "open":
            if "parsed" in rec:
                parsed = rec["parsed"]
                if isinstance(parsed, str) or not isinstance(parsed, Sequence):
                    raise ValueError(f"item {i}: field 'parsed' must be a list for an open question")
            else:
                response = field(rec, i, "response")
                if not isinstance(response, str):
                    raise ValueError(f"item {i}: field 'response' must be a string")
                parsed = parse_mmmu_open(response)
            unparsable = False
            ok = mmmu_open_correct(parsed, answer)
        else:
            raise ValueError(f"item {i}: field 'question_type' must be 'multiple-choice' or "
                             f"'open', got {qtype!r}")
        rows.append((subj, unparsable, ok))

    out: dict[str, float] = _summary(rows, "")
    out["n_multiple_choice"] = n_mc
    out["n_open"] = len(rows) - n_mc
    by_subj: dict[str, list] = defaultdict(list)
    for r in rows:
        if r[0] is not None:
            by_subj[r[0]].append(r)
    for disc, subs in DISCIPLINES.items():
        disc_rows = [r for s in subs for r in by_subj.get(s, [])]
        if disc_rows:
            out.update(_summary(disc_rows, f"Overall-{disc}/"))
        for s in subs:
            if s in by_subj:
                out.update(_summary(by_subj[s], f"{s}/"))
    return out


def _summary(rows: Sequence[tuple[Any, bool, bool]], prefix: str) -> dict[str, float]:
    n = len(rows)
    correct = sum(r[2] for r in rows)
    out = {f"{prefix}accuracy": ratio(correct, n), f"{prefix}n": n,
           f"{prefix}unparsable": sum(r[1] for r in rows)}
    if not prefix:
        out["correct"] = correct
    return out


# ------------------------------------------------------------------------------------ MMStar

MMSTAR_CATEGORIES: dict[str, tuple[str, ...]] = {
    "coarse perception": ("image scene and topic", "image style & quality", "image emotion"),
    "fine-grained perception": ("object counting", "recognition", "localization"),
    "instance reasoning": ("single-instance reasoning", "cross-instance attribute reasoning",
                           "cross-instance relation reasoning"),
    "logical reasoning": ("code & sequence reasoning", "diagram reasoning", "common reasoning"),
    "science & technology": ("biology & chemistry & physics",
                             "electronics & energy & mechanical eng.",
                             "geography & earth science & agriculture"),
    "math": ("geometry", "numeric commonsense and calculation", "statistical reasoning"),
}
_MMSTAR_PREFIXES = ("the answer is ", "option ", "(")


def parse_mmstar_answer(prediction: str, letters: str = "ABCD") -> str | None:
    """Option letter by the official MMStar rule (see module docstring), or None."""
    s = prediction.lower().strip().replace("\n", " ")
    pos = 0
    for p in _MMSTAR_PREFIXES:
        if s.startswith(p):
            pos = len(p)
            break
    if pos >= len(s):
        return None
    ch = s[pos].upper()
    return ch if ch in letters.upper() else None


def mmstar_scores(records: Sequence[Mapping]) -> dict[str, float]:
    """MMStar accuracy overall, per category and per l2 category.

    Each record: ``answer`` (letter), ``category``, ``l2_category`` (or ``l2-category``), and
    ``prediction`` (raw text, read by the official prefix rule) or ``parsed`` (a letter or None
    from another extractor). Returns ``accuracy``, ``n``, ``correct``, ``unparsable``,
    ``<category>/accuracy|n|unparsable`` and ``<category>/<l2_category>/accuracy|n|unparsable``.
    """
    rows = []
    for i, rec in enumerate(records):
        answer = str(field(rec, i, "answer")).strip().upper()
        cat = field(rec, i, "category")
        l2 = rec.get("l2_category", rec.get("l2-category"))
        if l2 is None:
            raise ValueError(f"item {i}: missing field 'l2_category'")
        if cat not in MMSTAR_CATEGORIES:
            raise ValueError(f"item {i}: field 'category' is {cat!r}, not an MMStar category")
        if l2 not in MMSTAR_CATEGORIES[cat]:
            raise ValueError(f"item {i}: field 'l2_category' is {l2!r}, not in category {cat!r}")
        if "parsed" in rec:
            pred = rec["parsed"]
            if pred is not None and not isinstance(pred, str):
                raise ValueError(f"item {i}: field 'parsed' must be a letter or None")
            pred = None if pred is None else pred.strip().upper()
        else:
            text = field(rec, i, "prediction")
            if not isinstance(text, str):
                raise ValueError(f"item {i}: field 'prediction' must be a string")
            pred = parse_mmstar_answer(text)
        rows.append(((cat, l2), pred is None, pred is not None and pred == answer))
    out = _summary(rows, "")
    for cat, l2s in MMSTAR_CATEGORIES.items():
        cat_rows = [r for r in rows if r[0][0] == cat]
        if not cat_rows:
            continue
        out.update(_summary(cat_rows, f"{cat}/"))
        for l2 in l2s:
            sub = [r for r in cat_rows if r[0][1] == l2]
            if sub:
                out.update(_summary(sub, f"{cat}/{l2}/"))
    return out


def mmstar_gain(s_v: float, s_wv: float, s_t: float | None = None) -> dict[str, float]:
    """MMStar's multi-modal gain ``mg = s_v - s_wv`` and, with the LLM base's text-only score
    ``s_t``, multi-modal leakage ``ml = max(0, s_wv - s_t)`` (NaN without ``s_t``)."""
    return {"mg": s_v - s_wv, "ml": max(0.0, s_wv - s_t) if s_t is not None else float("nan")}
