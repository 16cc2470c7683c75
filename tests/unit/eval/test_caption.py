import math

import pytest

from vlmalign.eval.caption import caption_scores, tokenize_caption

PREDS = ["the cat sat on the mat", "a dog barks"]
REFS = [["the cat sat on a mat", "a cat sat on the mat today"],
        ["a dog barks loudly", "the dog is barking"]]


def test_tokenizer_lowercases_and_strips_punctuation():
    assert tokenize_caption("A Man's red-car,  parked.") == "a man s red car parked"
    assert tokenize_caption("  ...  ") == ""


def test_bleu4_by_hand():
    # caption 1 (6 tokens) vs refs of 6 and 7 tokens, clipped by the max count in any one ref:
    #   1-grams the,cat,sat,on,the,mat: "the" twice but at most once per ref -> 5/6
    #   2-grams the cat(r1) cat sat sat on on the(r2) the mat(r2) -> 5/5
    #   3-grams the cat sat(r1) cat sat on, sat on the(r2), on the mat(r2) -> 4/4
    #   4-grams the cat sat on(r1), cat sat on the(r2), sat on the mat(r2) -> 3/3
    # caption 2 "a dog barks" (3 tokens): 3/3, 2/2, 1/1, 0 4-grams guessed
    # corpus: p1 = 8/9, p2 = 7/7, p3 = 5/5, p4 = 3/3
    # closest ref lengths: 6 (for 6) and 4 (for 3): r = 10, c = 9 -> BP = exp(1 - 10/9)
    expected = math.exp(1 - 10 / 9) * (8 / 9 * 1 * 1 * 1) ** 0.25  # = 0.86887...
    assert caption_scores(PREDS, REFS)["bleu4"] == pytest.approx(expected, rel=1e-6)


def test_rouge_l_by_hand():
    # caption 1: LCS with r1 = "the cat sat on mat" = 5 -> P 5/6, R 5/6; with r2 "cat sat on the
    #   mat" = 5 -> P 5/6, R 5/7. max P = max R = 5/6 -> F = 5/6 (F = P when P = R)
    # caption 2: r1 LCS 3 -> P 1, R 3/4; r2 LCS 1 ("dog") -> P 1/3, R 1/4. P = 1, R = 3/4:
    #   F = (1 + 1.44) * 1 * 0.75 / (0.75 + 1.44 * 1) = 1.83 / 2.19 = 61/73
    m = caption_scores(PREDS, REFS)
    assert m["rouge_l"] == pytest.approx((5 / 6 + 61 / 73) / 2)
    assert m["n"] == 2


def test_cider_idf_over_the_evaluated_set():
    # 2 images: IDF = log(2) - log(df). "car" is in both images' refs -> weight 0; "red", "blue"
    # and the bigrams have df 1 -> weight log 2. Each candidate equals its reference, so the
    # cosine is 1 for n = 1, 2; no 3-/4-grams -> 0. Per image 10 * (1 + 1 + 0 + 0) / 4 = 5.
    assert caption_scores(["red car", "blue car"],
                          [["red car"], ["blue car"]])["cider"] == pytest.approx(5.0)
    # a single image: every IDF is log(1) - log(1) = 0, so CIDEr is 0 even for a perfect caption
    assert caption_scores(["red car"], [["red car"]])["cider"] == 0.0


def test_cider_clipping_and_length_penalty_by_hand():
    # image 1 as above: 10 * (1 + 1) / 4 = 5 (all df 1 now: "car" is only in image 1's refs).
    # image 2: candidate "blue car" {blue: L, car: L}, reference "blue bus stop"
    #   {blue: L, bus: L, stop: L} with L = log 2: unigram cosine = L^2 / (sqrt2 L * sqrt3 L)
    #   = 1/sqrt6 ("car" clipped to the ref's 0); no shared bigram. The scorer's "length" counts
    #   bigrams: 1 vs 2 -> penalty exp(-1 / (2 * 6^2)). Image 2: 10 * exp(-1/72) / sqrt6 / 4.
    expected = (5 + 2.5 * math.exp(-1 / 72) / math.sqrt(6)) / 2
    m = caption_scores(["red car", "blue car"], [["red car"], ["blue bus stop"]])
    assert m["cider"] == pytest.approx(expected)


def test_empty_prediction_scores_zero_and_bad_input_raises():
    m = caption_scores(["", "blue car"], [["red car"], ["blue car"]])
    assert m["rouge_l"] == pytest.approx(0.5) and m["n"] == 2
    with pytest.raises(ValueError, match="length mismatch"):
        caption_scores(["a"], [])
    with pytest.raises(ValueError, match=r"item 1: field 'references' must be"):
        caption_scores(["a b", "c d"], [["a b"], []])
    with pytest.raises(ValueError, match=r"item 0: field 'references' entry 1 is empty"):
        caption_scores(["a b"], [["a b", " . "]])
    with pytest.raises(ValueError, match=r"item 0: field 'references' must be"):
        caption_scores(["a b"], ["a b"])
    assert math.isnan(caption_scores([], [])["cider"])
