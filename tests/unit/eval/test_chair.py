import pytest

from vlmalign.eval.chair import chair_scores, extract_objects


def test_chair_s_and_i_hand_computed():
    mentions = [["dog", "dog", "cat"],   # cat hallucinated: 1 of 3 mentions
                ["person"],              # fine
                [],                      # no objects: still a caption in CHAIR_s's denominator
                ["car", "bus"]]          # both hallucinated
    truth = [["dog"], ["person", "dog"], ["cat"], ["truck"]]
    m = chair_scores(mentions, truth)
    # CHAIR_s = 2 hallucinating captions / 4 captions = 0.5
    assert m["chair_s"] == pytest.approx(0.5)
    # CHAIR_i = (1 + 0 + 0 + 2) / (3 + 1 + 0 + 2) = 3/6 (repeated "dog" counts twice; not 3/5)
    assert m["chair_i"] == pytest.approx(0.5)
    assert (m["n"], m["mentions"], m["hallucinated_mentions"], m["hallucinated_captions"]) == (4, 6, 3, 2)


def test_synonyms_map_both_sides():
    m = chair_scores([["puppy"], ["man"]], [["dog"], ["person"]],
                     synonyms={"puppy": "dog", "man": "person"})
    assert m["chair_s"] == 0.0 and m["chair_i"] == 0.0


def test_extractor_longest_phrase_plurals_synonyms():
    vocab = ["dog", "bear", "teddy bear", "bus", "person"]
    objs = extract_objects("A teddy bear, two dogs, a puppy and buses; people.", vocab,
                           {"puppy": "dog", "people": "person"})
    assert objs == ["teddy bear", "dog", "dog", "bus", "person"]   # no extra "bear"
    m = chair_scores([objs], [["teddy bear", "dog"]])
    # hallucinated: bus, person -> CHAIR_i = 2/5, CHAIR_s = 1/1
    assert m["chair_i"] == pytest.approx(2 / 5) and m["chair_s"] == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="length mismatch"):
        chair_scores([["dog"]], [])
    with pytest.raises(ValueError, match=r"item 0: field 'mentions'"):
        chair_scores(["dog"], [["dog"]])
    with pytest.raises(ValueError, match=r"item 1: field 'ground_truth'"):
        chair_scores([[], []], [[], None])
