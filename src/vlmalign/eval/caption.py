"""Caption metrics: BLEU-4, ROUGE-L and CIDEr-D against several references per image.

The scores come from pycocoevalcap (salaniz/pycocoevalcap, the pip package of the COCO caption
evaluation of Chen et al., 2015, "Microsoft COCO Captions: Data Collection and Evaluation
Server"; ``pycocoevalcap/bleu/bleu_scorer.py``, ``rouge/rouge.py``, ``cider/cider_scorer.py``),
whose ``Bleu``, ``Rouge`` and ``Cider`` classes are pure Python:

* BLEU-4 (Papineni et al., 2002) is *corpus*-level: clipped n-gram matches and n-gram counts
  are summed over all captions before the precisions p1..p4 are formed;
  BLEU-4 = BP * (p1 p2 p3 p4)^(1/4), BP = exp(1 - r/c) when the total candidate length c is below
  r, the summed reference lengths, each the reference length closest to its candidate's (the
  shorter on ties). The scorer adds 1e-15 / 1e-9 to numerator / denominator, so a precision of
  0 gives a score of about 0 rather than an error.
* ROUGE-L (Lin, 2004) per caption: with the longest common subsequence against each reference,
  P = max_j LCS_j / |candidate|, R = max_j LCS_j / |ref_j| (maxima taken separately), and
  F = (1 + b^2) P R / (R + b^2 P) with b = 1.2; the corpus score is the mean over captions.
* CIDEr-D (Vedantam et al., CVPR 2015; the variant COCO reports as "CIDEr"): TF-IDF vectors of
  1..4-grams, the IDF being log(#images / #images whose references contain the n-gram) **over the
  evaluated set itself** (so scores depend on which captions are scored together, and a single
  image scores 0: its IDFs are all log(1/1) = 0), candidate weights clipped at the reference
  weight, a Gaussian length penalty exp(-(|c| - |r|)^2 / (2 * 6^2)), cosine per n averaged over
  n = 1..4 and over references, times 10; the corpus score is the mean over images.

Tokenisation differs from COCO's: pycocoevalcap's ``PTBTokenizer`` runs Stanford CoreNLP (Java)
with ``-lowerCase`` and drops punctuation tokens. ``tokenize_caption`` instead lower-cases, turns
every ASCII punctuation character into a space and splits on whitespace. Where they differ:
clitics ("man's" -> "man s", PTB "man 's"; "don't" -> "don t", PTB "do n't"), hyphenated words
("black-and-white" -> three tokens, PTB one), decimals ("2.5" -> "2 5") and symbols PTB keeps as
tokens ("&", "$", "%", "#", "/", "+"), which are dropped here. Plain COCO-style captions
tokenise the same way under both.
"""

from __future__ import annotations

import string
from typing import Sequence

_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


def tokenize_caption(text: str) -> str:
    """Lower-cased tokens joined by single spaces (see module docstring for how it differs from
    COCO's PTB tokenisation)."""
    return " ".join(text.lower().translate(_PUNCT_TO_SPACE).split())


def caption_scores(predictions: Sequence[str],
                   references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4, mean ROUGE-L and mean CIDEr-D of one caption per image against that image's
    references (any number >= 1), with pycocoevalcap's scorers on ``tokenize_caption`` tokens.

    Returns ``{"bleu4", "rouge_l", "cider", "n"}`` (``n`` = images; scores NaN when it is 0).
    An empty prediction is allowed (it scores 0); an empty or punctuation-only reference is an
    error, since ROUGE-L would then match an empty candidate.
    """
    if len(predictions) != len(references):
        raise ValueError(f"length mismatch: predictions={len(predictions)}, "
                         f"references={len(references)}")
    res: dict[int, list[str]] = {}
    gts: dict[int, list[str]] = {}
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise ValueError(f"item {i}: field 'prediction' must be a string")
        if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
            raise ValueError(f"item {i}: field 'references' must be a non-empty list of strings")
        toks = []
        for j, ref in enumerate(refs):
            if not isinstance(ref, str) or not tokenize_caption(ref):
                raise ValueError(f"item {i}: field 'references' entry {j} is empty or not a string")
            toks.append(tokenize_caption(ref))
        res[i] = [tokenize_caption(pred)]
        gts[i] = toks
    n = len(res)
    if n == 0:
        nan = float("nan")
        return {"bleu4": nan, "rouge_l": nan, "cider": nan, "n": 0}
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("caption_scores needs pycocoevalcap (pip install pycocoevalcap)") from e
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider), "n": n}
