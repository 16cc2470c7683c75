"""Reward functions, sources and their combination (vlmalign.rewards)."""

from __future__ import annotations

import math

import pytest
import torch

from vlmalign.config import ConfigError
from vlmalign.data.readers import read_file
from vlmalign.data.schema import ImageRef, Message, RankedList
from vlmalign.errors import DataError
from vlmalign.rewards import (REWARD_FUNCTIONS, CombinedReward, FunctionReward, JudgeReward, RewardInput,
                              RewardModelSource, build_reward, extract_choice, parse_score, parse_yes_no)


def inp(response, reference=None, **kw):
    return RewardInput(prompt=[Message.user("How many circles?")], response=response, reference=reference, **kw)


def fn(name, inputs, **kw):
    return REWARD_FUNCTIONS[name](inputs, **kw)


# ----------------------------------------------------------------------------- built-ins
def test_exact_match_normalises_and_extracts():
    xs = [inp("Two.", "2"), inp("2 circles", "2"), inp("The answer: two", "2"), inp("", "2")]
    # "Two." -> "2" matches; "2 circles" is not exactly "2"; an empty response never matches
    assert fn("exact_match", xs) == [1.0, 0.0, 0.0, 0.0]
    tagged = [inp("I think <answer>one</answer> no, <answer>Two</answer>", "2"), inp("two", "2")]
    # the LAST <answer> group is compared; no tag -> 0
    assert fn("exact_match", tagged, answer_pattern="<answer>(.*?)</answer>") == [1.0, 0.0]
    with pytest.raises(DataError, match="reference"):
        fn("exact_match", [inp("2")])


def test_contains_answer_whole_words():
    xs = [inp("There are two circles.", "2"), inp("There are 12 circles", "2"),
          inp("top left corner", "Top-left"), inp("no", "yes")]
    # "two" -> "2" found as a word; "12" is not "2"; "top-left" -> "top left" appears; "yes" absent
    assert fn("contains_answer", xs) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(DataError, match="empty after normalisation"):
        fn("contains_answer", [inp("the", "the")])


@pytest.mark.parametrize("text,letter", [
    ("(B)", "B"), ("Answer: b", "B"), ("B.", "B"), ("b", "B"), ("c) yes", "C"),
    ("The answer is (C) because it is red", "C"), ("The correct answer is D since", "D"),
    ("Answer: **A**", "A"), ("I pick (d), the green one", "D"),
    ("A cat sits on the mat", None),              # a leading article is not a choice
    ("the answer is a red circle", None),         # lower-case 'a' followed by a word
    ("(A) red (B) blue", None),                   # options listed, none chosen
    ("(A) red (B) blue. Answer: B", "B"),         # ... unless an explicit answer follows
    ("Blue", None), ("E.", None), ("", None),
])
def test_extract_choice_rules(text, letter):
    assert extract_choice(text) == letter


def test_mc_letter():
    xs = [inp("(B)", "B"), inp("Answer: b", "(B) blue"), inp("C.", "B"), inp("E", "E")]
    # E is a letter only with letters="ABCDE"
    assert fn("mc_letter", xs[:3]) == [1.0, 1.0, 0.0]
    assert fn("mc_letter", xs, letters="ABCDE") == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(DataError, match="not one of the letters"):
        fn("mc_letter", [inp("A", "blue")])


def test_format_reward():
    pat = r"<think>.*</think>\s*<answer>.*</answer>"
    xs = [inp("<think>a\nb</think> <answer>2</answer>", finished=True),
          inp("<answer>2</answer>", finished=True),
          inp("<think>x</think><answer>2</answer>", finished=False)]
    # '.' spans newlines; the second lacks <think>; the third hit the token budget
    assert fn("format", xs, pattern=pat) == [1.0, 0.0, 1.0]
    assert fn("format", xs, pattern=pat, require_finished=True) == [1.0, 0.0, 0.0]
    assert fn("format", [inp("so <answer>2</answer>.")], pattern="<answer>", mode="search") == [1.0]
    with pytest.raises(DataError, match="finished"):
        fn("format", [inp("x")], pattern="x", require_finished=True)


def test_length_penalty_dapo_soft_overlong():
    xs = [inp("a", response_tokens=n) for n in (10, 16, 18, 20, 25)]
    # max 20, buffer 4 -> free up to 16; 18: (16 - 18) / 4 = -0.5 ; 20: -1 ; 25 > 20: -1
    assert fn("length_penalty", xs, max_length=20, buffer=4) == [0.0, 0.0, -0.5, -1.0, -1.0]
    # words: "a b c" = 3 words; max 4 buffer 2 -> (2 - 3) / 2 = -0.5
    assert fn("length_penalty", [inp("a b c")], max_length=4, buffer=2, unit="words") == [-0.5]
    with pytest.raises(DataError, match="response_tokens"):
        fn("length_penalty", [inp("a")], max_length=4, buffer=2)


# ----------------------------------------------------------------------------- sources, combination
def test_function_reward_checks_outputs_and_options():
    src = FunctionReward("exact_match")
    assert src([inp("two", "2"), inp("3", "2")]).tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match="did you mean 'exact_match'"):
        FunctionReward("exact_mach")
    with pytest.raises(ConfigError, match="bad args"):
        FunctionReward("exact_match", kwargs={"pattern": "x"})
    with pytest.raises(ConfigError, match="not a valid regex"):
        FunctionReward("format", kwargs={"pattern": "("})
    bad = FunctionReward(lambda xs: [float("nan")] * len(xs), name="nanny")
    with pytest.raises(DataError, match="nanny.*not finite"):
        bad([RewardInput([Message.user("q")], "r", source="f.json", index=7)])
    short = FunctionReward(lambda xs: [1.0], name="short")
    with pytest.raises(ValueError, match=r"shape \(1,\) for 2 inputs"):
        short([inp("a"), inp("b")])


def test_combined_reward_weights_and_parts():
    ones = FunctionReward(lambda xs: [1.0] * len(xs), name="one")
    em = FunctionReward("exact_match")
    comb = CombinedReward([(em, 1.0), (ones, -0.5), (em, 0.0)])
    total, parts = comb([inp("two", "2"), inp("3", "2")])
    # total = 1.0 * [1, 0] - 0.5 * [1, 1] + 0 * [1, 0] = [0.5, -0.5]
    assert total.tolist() == [0.5, -0.5]
    assert list(parts) == ["exact_match", "one", "exact_match_2"]       # unique log names
    assert parts["one"].tolist() == [1.0, 1.0]                          # unweighted
    assert comb.weights == {"exact_match": 1.0, "one": -0.5, "exact_match_2": 0.0}
    with pytest.raises(ConfigError, match="weight"):
        CombinedReward([(em, float("inf"))])


def test_build_reward_from_recipe_and_errors(tmp_path):
    r = build_reward([{"type": "function", "name": "exact_match", "weight": 2.0},
                      {"type": "function", "name": "format", "args": {"pattern": r"\d+"}, "weight": 0.5,
                       "label": "digits"}])
    total, parts = r([inp("2", "2"), inp("two", "2")])
    # [2*1 + 0.5*1, 2*1 + 0.5*0] = [2.5, 2.0]
    assert total.tolist() == [2.5, 2.0] and set(parts) == {"exact_match", "digits"}
    with pytest.raises(ConfigError, match=r"reward\[1\]: unknown key 'nme'.*did you mean 'name'"):
        build_reward([{"type": "function", "name": "exact_match"}, {"type": "function", "nme": "x"}])
    with pytest.raises(ConfigError, match=r"reward\[0\]: type must be"):
        build_reward([{"type": "critic"}])
    with pytest.raises(ConfigError, match=r"reward\[0\]: model path .* does not exist"):
        build_reward([{"type": "model", "path": str(tmp_path / "nope")}])
    with pytest.raises(ConfigError, match=r"reward\[0\]: reward function 'format'"):
        build_reward([{"type": "function", "name": "format"}])            # pattern is required
    with pytest.raises(ConfigError, match="non-empty list"):
        build_reward([])


def test_user_module_function_is_imported(tmp_path, monkeypatch):
    (tmp_path / "rlloss_user_rewards.py").write_text(
        "def chars(inputs, scale=1.0):\n"
        "    return [scale * len(x.response) for x in inputs]\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = build_reward([{"type": "function", "name": "rlloss_user_rewards:chars", "args": {"scale": 0.5}}])
    total, parts = r([inp("abcd"), inp("ab")])
    assert total.tolist() == [2.0, 1.0] and list(parts) == ["rlloss_user_rewards:chars"]
    with pytest.raises(ConfigError, match="cannot import module 'rlloss_no_such_module'"):
        FunctionReward("rlloss_no_such_module:f")
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        FunctionReward("rlloss_user_rewards:missing")
    with pytest.raises(ConfigError, match="not callable"):
        FunctionReward("rlloss_user_rewards:NOT_CALLABLE")


def test_reward_input_images_follow_the_prompt():
    img = ImageRef(path="a.png")
    x = RewardInput([Message.user(img, "q?")], "r")
    assert x.images == [img] and x.question == "q?"
    with pytest.raises(ValueError, match="differ"):
        RewardInput([Message.user("q")], "r", images=[img])


# ----------------------------------------------------------------------------- judge parsing
@pytest.mark.parametrize("text,score", [
    ("7", 7.0), ("Score: 8.5", 8.5), ("I'd say 6 because ...", 6.0), ("rating of 2 out of 10", 2.0),
    ("8/10", 8.0), ("4/5", 8.0),                   # 4/5 rescaled to the 1-10 scale: 4 * 10 / 5
    ("score 11", None), ("0", None), ("no idea", None), ("", None),
])
def test_parse_score(text, score):
    assert parse_score(text, 1, 10) == score


@pytest.mark.parametrize("text,value", [
    ("Yes, it is.", 1.0), ("no.", 0.0), ("I think yes", 1.0), ("It is not, so no", 0.0),
    ("maybe", None), ("Nope", None), ("well yes or no", None),
])
def test_parse_yes_no(text, value):
    assert parse_yes_no(text) == value


# ----------------------------------------------------------------------------- model-backed sources
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
    root = tmp_path_factory.mktemp("rewards")
    generate_shapesworld(root / "data", ShapesConfig(seed=3, train_images=4, eval_images=4))
    recs = read_file(root / "data" / "rl_eval.json")[:3]
    return root, recs


def _inputs(recs):
    """Two responses per prompt (k=2), so each image is shared by two inputs."""
    out = []
    for rec in recs:
        for resp in (rec.reference, "a blue square in the top left"):
            out.append(RewardInput.from_record(rec, resp))
    return out


def test_reward_model_source_matches_rm_scoring(world, tmp_path):
    from vlmalign.data.batching import ImageLoader
    from vlmalign.rewards.scoring import score_records
    from vlmalign.models import ScalarModel, adapter_for, build_tiny
    root, recs = world
    torch.manual_seed(0)
    m, p = build_tiny("llava")
    model = ScalarModel(adapter_for(m, p), seed=0)
    model.save_pretrained(tmp_path / "rm")
    p.save_pretrained(tmp_path / "rm")
    src = RewardModelSource(str(tmp_path / "rm"), image_root=root / "data", batch_size=6)
    inputs = _inputs(recs)
    enc_before = (src.model.adapter.encode_calls, src.model.adapter.encoded_images)
    got = src(inputs)
    # one batch of 6 responses over 3 images: one encode call, 3 images encoded
    assert (src.model.adapter.encode_calls - enc_before[0], src.model.adapter.encoded_images - enc_before[1]) == (1, 3)
    # rewards/scoring.py's scoring of the same (prompt, response) candidates, as ranked lists of 2
    ranked = [RankedList(rec.prompt, [rec.reference, "a blue square in the top left"]) for rec in recs]
    model.eval()
    want = [row["score"] for row in score_records(model, ranked, ImageLoader(model.adapter, root / "data"))]
    assert got.shape == (6,) and got.dtype == torch.float32
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert len({round(v, 5) for v in got.tolist()}) > 1          # scores are not all equal
    # batch size does not change scores
    assert RewardModelSource(model, image_root=root / "data", batch_size=1)(inputs).tolist() == pytest.approx(
        want, abs=1e-5)
    # empty responses: refused by default, or scored empty_score and counted
    empty = [RewardInput.from_record(recs[0], "  ")] + inputs[:1]
    with pytest.raises(DataError, match="empty_score"):
        src(empty)
    src0 = RewardModelSource(model, image_root=root / "data", empty_score=-3.0)
    vals = src0(empty)
    assert vals[0].item() == -3.0 and vals[1].item() == pytest.approx(want[0], abs=1e-5)
    assert src0.stats() == {"scored": 2.0, "empty": 1.0}
    # through a recipe
    r = build_reward([{"type": "model", "path": str(tmp_path / "rm"), "weight": 0.5}], image_root=root / "data")
    total, parts = r(inputs)
    assert total.tolist() == pytest.approx([0.5 * w for w in want], abs=1e-5)


def test_judge_on_a_tiny_random_model_counts_unparsable(world):
    from vlmalign.models import adapter_for, build_tiny
    root, recs = world
    torch.manual_seed(0)
    m, p = build_tiny("llava")
    judge = JudgeReward(adapter_for(m, p), image_root=root / "data", max_new_tokens=4, default=-1.0)
    inputs = _inputs(recs)
    before = judge.adapter.encoded_images
    vals = judge(inputs)
    assert judge.adapter.encoded_images - before == 3       # 3 unique images, encoded once
    assert len(judge.last_outputs) == 6 and judge.judged == 6
    parsed = [parse_score(o, 1, 10) for o in judge.last_outputs]
    assert judge.unparsable == sum(v is None for v in parsed)
    assert vals.tolist() == [-1.0 if v is None else v for v in parsed]
    assert judge.stats()["unparsable_rate"] == judge.unparsable / 6
    # the prompt shows the image and the filled template (with the reference line)
    msgs = judge.messages(inputs[0])
    assert msgs[-1].images == inputs[0].images
    assert f"Reference answer: {recs[0].reference}" in msgs[-1].text and inputs[0].question in msgs[-1].text


def test_judge_parsing_and_counting_with_fixed_answers(world, monkeypatch):
    import importlib

    from vlmalign.models import adapter_for, build_tiny
    root, recs = world
    m, p = build_tiny("llava")
    answers = iter([[["Score: 9"], ["garbage"], ["3/5"]], [["yes"], ["no way"], ["dunno"]]])
    gen = importlib.import_module("vlmalign.rollout.generate")   # the package re-exports a function of that name
    monkeypatch.setattr(gen, "generate", lambda *a, **k: next(answers))
    inputs = _inputs(recs)[:3]
    judge = JudgeReward(adapter_for(m, p), image_root=root / "data", normalize=True)
    # normalised (s - 1) / 9: 9 -> 8/9 ; garbage -> default 0 ; 3/5 -> 6 -> 5/9
    assert judge(inputs).tolist() == pytest.approx([8 / 9, 0.0, 5 / 9])
    assert judge.stats()["unparsable"] == 1.0
    yn = JudgeReward(adapter_for(m, p), mode="yes_no", image_root=root / "data", default=0.5, name="yn")
    assert yn(inputs).tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ConfigError, match="uses {answer}"):
        JudgeReward(adapter_for(m, p), template="Q: {question} A: {answer}")
    custom = JudgeReward(adapter_for(m, p), template="{question} / {response} / {reference}")
    with pytest.raises(DataError, match="no reference"):
        custom.messages(RewardInput([Message.user("q")], "r"))
    assert math.isclose(judge.low, 1.0)


def test_caption_errors_reward_counts_wrong_cells_against_the_reference():
    fn = REWARD_FUNCTIONS["caption_errors"]
    ref = "A red circle in the top left and a blue square in the bottom right."
    got = fn([inp(ref, ref), inp("A red circle in the top left.", ref),
              inp("A red circle in the top left, a red square in the top right and a blue square in the bottom "
                  "right.", ref), inp("A green circle in the top left.", ref)])
    assert got == [0.0, -1.0, -1.0, -2.0]
    with pytest.raises(DataError, match="reference"):
        fn([inp("A red circle in the top left.")])
