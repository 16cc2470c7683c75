"""CHAIR object-hallucination metrics (Rohrbach et al., 2018, "Object Hallucination in Image
Captioning", EMNLP; reference code LisaAnne/Hallucination ``utils/chair.py``, ``compute_chair``).

* CHAIR_s = captions with at least one hallucinated object mention / all captions (captions that
  mention no object count in the denominator, as in the reference code).
* CHAIR_i = hallucinated object mentions / all object mentions, over all captions; mentions are
  counted with repetition ("a dog and another dog" is two mentions), as the reference code does.
* a mention is hallucinated when its canonical object is not in the image's ground-truth objects
  (also mapped to canonical names).

``chair_scores`` takes the mentioned objects per caption (from any extractor). ``extract_objects``
is a deliberately simple word matcher, not the reference pipeline (which tokenises with NLTK,
singularises with pattern.en and hard-codes MSCOCO rules such as "hot dog" is not a dog): it
lower-cases, splits on non-letters, accepts a phrase or its regular plural (last word + "s" /
+ "es"), and matches the longest vocabulary phrase first, so "teddy bear" is not also a "bear". ``synonyms`` maps each word or
phrase to its canonical object ("puppy" -> "dog").
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

from ._common import check_same_length, ratio


def _forms(phrase: str) -> list[tuple[str, ...]]:
    """The phrase's words, plus its regular plurals (last word + "s" / + "es")."""
    words = tuple(phrase.lower().split())
    if not words:
        return []
    return [words, words[:-1] + (words[-1] + "s",), words[:-1] + (words[-1] + "es",)]


def extract_objects(caption: str, vocabulary: Iterable[str],
                    synonyms: Mapping[str, str] | None = None) -> list[str]:
    """Canonical objects mentioned in ``caption``, one entry per mention, in order.

    ``vocabulary``: canonical object names (single words or phrases); ``synonyms``: extra word or
    phrase -> canonical name. Matching is on lower-case words (a phrase or its regular plural: last word + "s"/"es";
    irregular plurals such as "people" need a synonym entry), longest phrase first.
    """
    table: dict[tuple[str, ...], str] = {}
    pairs = [(name, name) for name in vocabulary] + list((synonyms or {}).items())
    for phrase, name in pairs:
        for form in _forms(phrase):
            table.setdefault(form, name)
    longest = max((len(k) for k in table), default=0)
    words = re.findall(r"[a-z]+", caption.lower())
    found, i = [], 0
    while i < len(words):
        for size in range(min(longest, len(words) - i), 0, -1):
            name = table.get(tuple(words[i:i + size]))
            if name is not None:
                found.append(name)
                i += size
                break
        else:
            i += 1
    return found


def chair_scores(mentions: Sequence[Sequence[str]], ground_truth: Sequence[Iterable[str]],
                 synonyms: Mapping[str, str] | None = None) -> dict[str, float]:
    """CHAIR_s and CHAIR_i from per-caption object mentions and per-image ground-truth objects.

    ``mentions[i]``: the objects caption i mentions (one entry per mention); ``ground_truth[i]``:
    the objects in caption i's image. ``synonyms`` (optional) maps names on either side to a
    canonical name before comparing. Returns ``chair_s``, ``chair_i``, ``n`` (captions),
    ``hallucinated_captions``, ``mentions``, ``hallucinated_mentions``.
    """
    check_same_length(mentions=mentions, ground_truth=ground_truth)
    syn = {k.lower(): v.lower() for k, v in (synonyms or {}).items()}

    def canon(x: str) -> str:
        x = x.strip().lower()
        return syn.get(x, x)

    bad_caps = n_mentions = bad_mentions = 0
    for i, (objs, gt) in enumerate(zip(mentions, ground_truth)):
        if objs is None or isinstance(objs, str):
            raise ValueError(f"item {i}: field 'mentions' must be a list of object names")
        if gt is None or isinstance(gt, str):
            raise ValueError(f"item {i}: field 'ground_truth' must be a list of object names")
        truth = {canon(g) for g in gt}
        bad = sum(canon(o) not in truth for o in objs)
        n_mentions += len(objs)
        bad_mentions += bad
        bad_caps += bad > 0
    n = len(mentions)
    return {"chair_s": ratio(bad_caps, n), "chair_i": ratio(bad_mentions, n_mentions), "n": n,
            "hallucinated_captions": bad_caps, "mentions": n_mentions,
            "hallucinated_mentions": bad_mentions}
