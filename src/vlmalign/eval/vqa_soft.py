"""VQAv2 soft accuracy (Antol et al., 2015; Goyal et al., 2017) with the official normalisation.

Follows ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA:

* prediction: ``\\n``/``\\t`` -> space, strip, then punctuation processing, then digit/article
  processing (lower-case, number words zero..ten and "none" -> digits, drop a/an/the, restore
  contractions such as "dont" -> "don’t" from the tool's table).
* punctuation processing: each of ``; : / ' [ ] " ( ) = + \\ _ > < @ ` , ?`` is deleted when it
  touches a space in the input (or when the input has a digit,digit comma), else replaced by a
  space; then periods not followed by a digit are deleted. The tool's regex is
  ``(?!<=\\d)(\\.)(?!\\d)`` (a mistyped look-behind, so a period after a digit is deleted too) and
  it passes ``re.UNICODE`` as the *count* argument, so at most 32 periods are removed; both are
  reproduced.
* human answers: only when the 10 answers are not all identical, each gets punctuation processing
  (no lower-casing, no digit/article step: the released annotations are already normalised).
  ``normalize_references=True`` applies the prediction's full normalisation to them instead, for
  raw references.
* accuracy of a question = mean over the 10 leave-one-out subsets of 9 human answers of
  ``min(#matches in the subset / 3, 1)``; the dataset score is the mean over questions.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

from ._common import check_same_length

# Contraction table of vqaEval.py (keys without apostrophes -> contracted form), kept as data.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn’t’ve
couldnt’ve=couldn’t’ve didnt=didn’t doesnt=doesn’t dont=don’t hadnt=hadn’t hadnt’ve=hadn’t’ve
hadn'tve=hadn’t’ve hasnt=hasn’t havent=haven’t hed=he’d hed’ve=he’d’ve he’dve=he’d’ve hes=he’s
howd=how’d howll=how’ll hows=how’s Id’ve=I’d’ve I’dve=I’d’ve Im=I’m Ive=I’ve isnt=isn’t itd=it’d
itd’ve=it’d’ve it’dve=it’d’ve itll=it’ll let’s=let’s maam=ma’am mightnt=mightn’t
mightnt’ve=mightn’t’ve mightn’tve=mightn’t’ve mightve=might’ve mustnt=mustn’t mustve=must’ve
neednt=needn’t notve=not’ve oclock=o’clock oughtnt=oughtn’t ow’s’at=’ow’s’at ’ows’at=’ow’s’at
’ow’sat=’ow’s’at shant=shan’t shed’ve=she’d’ve she’dve=she’d’ve she’s=she’s shouldve=should’ve
shouldnt=shouldn’t shouldnt’ve=shouldn’t’ve shouldn’tve=shouldn’t’ve somebody’d=somebodyd
somebodyd’ve=somebody’d’ve somebody’dve=somebody’d’ve somebodyll=somebody’ll somebodys=somebody’s
someoned=someone’d someoned’ve=someone’d’ve someone’dve=someone’d’ve someonell=someone’ll
someones=someone’s somethingd=something’d somethingd’ve=something’d’ve
something’dve=something’d’ve somethingll=something’ll thats=that’s thered=there’d
thered’ve=there’d’ve there’dve=there’d’ve therere=there’re theres=there’s theyd=they’d
theyd’ve=they’d’ve they’dve=they’d’ve theyll=they’ll theyre=they’re theyve=they’ve twas=’twas
wasnt=wasn’t wed’ve=we’d’ve we’dve=we’d’ve weve=we've werent=weren’t whatll=what’ll whatre=what’re
whats=what’s whatve=what’ve whens=when’s whered=where’d wheres=where's whereve=where’ve whod=who’d
whod’ve=who’d’ve who’dve=who’d’ve wholl=who’ll whos=who’s whove=who've whyll=why’ll whyre=why’re
whys=why’s wont=won’t wouldve=would’ve wouldnt=wouldn’t wouldnt’ve=wouldn’t’ve
wouldn’tve=wouldn’t’ve yall=y’all yall’ll=y’all’ll y’allll=y’all’ll yall’d’ve=y’all’d’ve
y’alld’ve=y’all’d’ve y’all’dve=y’all’d’ve youd=you’d youd’ve=you’d’ve you’dve=you’d’ve
youll=you’ll youre=you’re youve=you’ve
""".split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`",
          ",", "?"]
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: as in vqaEval.py (see module docstring)


def process_punctuation(text: str, punct=_PUNCT, period=_PERIOD) -> str:
    """vqaEval.py's processPunctuation (VLMEvalKit's YOrN extraction uses it with its own
    ``punct`` list and ``period`` pattern)."""
    out = text
    has_digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in punct:
        touches_space = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if touches_space or has_digit_comma else " ")
    return period.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """vqaEval.py's processDigitArticle: lower-case, number words -> digits, drop articles,
    restore contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(answer: str) -> str:
    """The full normalisation vqaEval.py applies to a predicted answer."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_soft_score(prediction: str, human_answers: Sequence[str], *,
                   normalize_references: bool = False) -> float:
    """Soft accuracy of one prediction against its human answers (10 in VQAv2)."""
    pred = normalize_vqa_answer(prediction)
    if normalize_references:
        refs = [normalize_vqa_answer(a) for a in human_answers]
    elif len(set(human_answers)) > 1:
        refs = [process_punctuation(a) for a in human_answers]
    else:
        refs = list(human_answers)
    matches = sum(r == pred for r in refs)
    # leave-one-out: dropping a matching answer leaves matches-1, a non-matching one leaves matches
    per_subset = [min(1.0, (matches - (r == pred)) / 3) for r in refs]
    return sum(per_subset) / len(per_subset)


def vqa_soft_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]],
                      groups: Sequence[str] | None = None, *,
                      normalize_references: bool = False) -> dict[str, float]:
    """Mean VQAv2 soft accuracy (fraction, not the tool's 0-100) over questions.

    ``human_answers[i]`` is the list of (10) annotator answers of question i; ``groups`` (e.g.
    the answer type) adds ``accuracy/<group>`` and ``n/<group>``. Returns ``accuracy`` and ``n``.
    """
    check_same_length(predictions=predictions, human_answers=human_answers, groups=groups)
    scores = []
    for i, (p, refs) in enumerate(zip(predictions, human_answers)):
        if not isinstance(p, str):
            raise ValueError(f"item {i}: field 'prediction' must be a string")
        if isinstance(refs, str) or not refs or not all(isinstance(a, str) for a in refs):
            raise ValueError(f"item {i}: field 'answers' must be a non-empty list of strings")
        scores.append(vqa_soft_score(p, refs, normalize_references=normalize_references))
    out: dict[str, float] = {"accuracy": sum(scores) / len(scores) if scores else float("nan"),
                             "n": len(scores)}
    if groups is not None:
        by: dict[str, list[float]] = defaultdict(list)
        for i, (g, s) in enumerate(zip(groups, scores)):
            if g is None:
                raise ValueError(f"item {i}: missing field 'group'")
            by[str(g)].append(s)
        for g, ss in sorted(by.items()):
            out[f"accuracy/{g}"] = sum(ss) / len(ss)
            out[f"n/{g}"] = len(ss)
    return out
