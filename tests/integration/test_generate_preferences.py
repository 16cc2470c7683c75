"""Self-critique preference generation (methods/self_critique.py, `vlmalign generate-preferences`) on
a tiny random-init LLaVA and ShapesWorld prompts: verdict parsing, order consistency with
deterministic fake judges, de-duplication, pair budgets, reward-model ranking (best vs worst /
each, ties, best-of-n), images encoded once per sampling call, image paths, the real
self-judge, and the output fed straight into DPO (library and CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vlmalign.config import ConfigError, load_config
from vlmalign.data.batching import ImageLoader
from vlmalign.data.readers import read_file
from vlmalign.data.schema import Conversation, ImageRef, Message, PreferencePair, RLPrompt
from vlmalign.errors import DataError
from vlmalign.methods.dpo import DPOConfig, load_pairs, train_dpo
from vlmalign.methods.self_critique import (JUDGE_TEMPLATE, JudgeRequest, SelfCritiqueConfig, VLMJudge, as_prompt,
                                            generate_preferences, load_prompts, parse_verdict, relocate_images)
from vlmalign.models import ScalarModel, adapter_for, build_tiny, load_adapter, save_tiny
from vlmalign.rewards import RewardInput, RewardModelSource

N_PROMPTS = 4
SAMPLE = dict(n=4, max_new_tokens=6, temperature=1.0, batch_size=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
    root = tmp_path_factory.mktemp("genpref")
    generate_shapesworld(root / "data", ShapesConfig(seed=1, train_images=6, eval_images=2))
    save_tiny("llava", str(root / "model"))
    m, p = build_tiny("llava", seed=3)
    ScalarModel(adapter_for(m, p), seed=0).save_pretrained(root / "rm")
    p.save_pretrained(root / "rm")
    return root


@pytest.fixture(scope="module")
def policy(world):
    ad = load_adapter(str(world / "model"))
    ad.model.eval()
    return ad


def _prompts(world, n=N_PROMPTS):
    return load_prompts(world / "data" / "rl_train.json", limit=n)


def _run(world, policy, tmp_path, name="prefs.jsonl", out_dir=None, **kw):
    """generate_preferences into the data directory (the image root) unless ``out_dir`` is given."""
    data = world / "data"
    cfg = SelfCritiqueConfig(**{**SAMPLE, **kw.pop("cfg", {})})
    out = (out_dir or data) / name
    summary_out = tmp_path / (name + ".summary.json")
    s = generate_preferences(policy, kw.pop("prompts", None) or _prompts(world), ImageLoader(policy, data), cfg,
                             out=out, summary_out=summary_out, **kw)
    return s, out


class Recorder:
    """A fake judge: answers with ``rule(request)`` and keeps every request."""

    def __init__(self, rule):
        self.rule, self.requests = rule, []

    def __call__(self, reqs):
        self.requests += list(reqs)
        return [self.rule(r) for r in reqs]


# ----------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize("text,want", [
    ("A", "A"), (" b ", "B"), ('"B".', "B"), ("**A**", "A"), ("(a)", "A"), ("[B]", "B"),   # rule 1
    ("A. It names the colour.", "A"), ("B: the second one", "B"), ("B is better", "B"),      # rule 2
    ("A, because it counts right", "A"),
    ("I prefer Response B.", "B"), ("The better one is answer A", "A"), ("[[A]]", "A"),      # rule 3
    ("Option (B) wins", "B"), ("Response A is wrong, so Response A loses", "A"),
    ("Response A is fine but Response B is better", None),                                 # both named
    ("A cat is in the image", None),         # an article, not a verdict
    ("a. or b.", None), ("", None), ("neither", None), ("AB", None), ("both are good", None),
])
def test_parse_verdict_rules(text, want):
    assert parse_verdict(text) == want


# ----------------------------------------------------------------------------- judge mode
def test_a_biased_judge_keeps_nothing(world, policy, tmp_path):
    judge = Recorder(lambda r: "A")
    with pytest.raises(DataError, match="no preference pairs were kept"):
        _run(world, policy, tmp_path, "biased.jsonl", judge=judge)
    s = json.loads((tmp_path / "biased.jsonl.summary.json").read_text())
    assert s["pairs"] == 0 and s["out"] is None
    assert s["judged_pairs"] > 0 and s["inconsistent"] == s["judged_pairs"] and s["unparsable"] == 0
    assert len(judge.requests) == 2 * s["judged_pairs"]
    assert not (world / "data" / "biased.jsonl").exists()


def test_a_consistent_judge_keeps_every_pair_with_the_right_side(world, policy, tmp_path):
    # a position-free rule: the alphabetically smaller response is better, in either order
    judge = Recorder(lambda r: "A" if r.response_a < r.response_b else "B")
    s, out = _run(world, policy, tmp_path, judge=judge)
    assert s["prompts"] == N_PROMPTS and s["samples"] == N_PROMPTS * 4
    assert s["unique"] + s["duplicates"] + s["empty"] == s["samples"]
    # every pair of distinct responses, asked in both orders
    assert s["judged_pairs"] == sum(u * (u - 1) // 2 for u in _unique_counts(judge))
    assert s["inconsistent"] == 0 and s["pairs"] == s["judged_pairs"]
    reqs = judge.requests
    for a, b in zip(reqs[::2], reqs[1::2]):
        assert (a.record, a.response_a, a.response_b) == (b.record, b.response_b, b.response_a)
    pairs = read_file(out, kind="preference")
    assert len(pairs) == s["pairs"]
    for p in pairs:
        assert p.chosen < p.rejected                      # the side the judge preferred
        assert p.meta["judge_answers"] in (["A", "B"], ["B", "A"])
    # the prompts are the RL prompts' own (image first, question text)
    prompts = {p.meta["prompt_id"]: p for p in pairs}
    src = {r.id: r for r in _prompts(world)}
    for pid, p in prompts.items():
        assert [m.text for m in p.prompt] == [m.text for m in src[pid].prompt]
        assert p.images == src[pid].images
    assert s["paths_relative_to"] == "out_dir" and "data.image_root" not in s["train"]


def _unique_counts(judge):
    """Distinct responses per prompt, from the requests a judge saw."""
    seen: dict[int, set] = {}
    for r in judge.requests:
        seen.setdefault(id(r.record), set()).update((r.response_a, r.response_b))
    return [len(v) for v in seen.values()]


def test_unparsable_answers_drop_their_pair(world, policy, tmp_path):
    # requests are numbered 1, 2, ... in the order the judge gets them; pair k is requests 2k+1
    # (A=x, B=y) and 2k+2 (A=y, B=x). Every third request gets an unparsable answer, the others
    # a position-free verdict, so a pair survives exactly when neither of its numbers is a
    # multiple of 3: pairs 0 (1, 2), 2 (5, 6)... are dropped when they hold 3, 6, 9, ...
    count = {"n": 0}

    def rule(r):
        count["n"] += 1
        return "I cannot tell" if count["n"] % 3 == 0 else ("A" if r.response_a < r.response_b else "B")

    judge = Recorder(rule)
    s, out = _run(world, policy, tmp_path, "unparsable.jsonl", judge=judge)
    P = len(judge.requests) // 2
    dropped = [k for k in range(P) if (2 * k + 1) % 3 == 0 or (2 * k + 2) % 3 == 0]
    assert P == s["judged_pairs"] >= 6
    assert s["unparsable"] == (2 * P) // 3                   # multiples of 3 in 1..2P
    assert s["inconsistent"] == len(dropped) and s["pairs"] == P - len(dropped)
    kept = [(judge.requests[2 * k].response_a, judge.requests[2 * k].response_b) for k in range(P)
            if k not in dropped]
    pairs = read_file(out, kind="preference")
    assert [(p.chosen, p.rejected) for p in pairs] == [(min(x, y), max(x, y)) for x, y in kept]


def test_pair_budget(world, policy, tmp_path):
    judge = Recorder(lambda r: "A" if r.response_a < r.response_b else "B")
    s, _ = _run(world, policy, tmp_path, "budget.jsonl", judge=judge, cfg={"max_pairs": 2})
    uniq = _unique_counts(judge)
    assert s["judged_pairs"] == sum(min(2, u * (u - 1) // 2) for u in uniq) == len(judge.requests) // 2
    assert s["judged_pairs"] < sum(u * (u - 1) // 2 for u in uniq)


def test_identical_responses_are_merged_and_counted(world, policy, tmp_path):
    # greedy decoding gives the same response n times: 3 duplicates per prompt, nothing to pair
    judge = Recorder(lambda r: "A")
    with pytest.raises(DataError, match="no preference pairs"):
        _run(world, policy, tmp_path, "greedy.jsonl", judge=judge, cfg={"temperature": 0.0})
    s = json.loads((tmp_path / "greedy.jsonl.summary.json").read_text())
    assert (s["unique"], s["duplicates"], s["prompts_without_pairs"]) == (N_PROMPTS, 3 * N_PROMPTS, N_PROMPTS)
    assert judge.requests == []


def test_images_are_encoded_once_per_sampling_call(world, policy, tmp_path):
    prompts = _prompts(world, 5)
    # prompt 4 shows prompt 0's image: within one call they would share it; here they are in
    # different calls (batch_size 2: calls [0, 1], [2, 3], [4])
    prompts[4] = RLPrompt([Message.user(prompts[0].images[0], "How many shapes are there?")], source="x.json",
                          index=4)
    calls, imgs = policy.encode_calls, policy.encoded_images
    _run(world, policy, tmp_path, "enc.jsonl", judge=Recorder(lambda r: "A" if r.response_a < r.response_b else "B"),
         prompts=prompts)
    assert policy.encode_calls - calls == 3                      # one per sampling call, for its 4 x k rows
    assert policy.encoded_images - imgs == 5                     # one per prompt image, not per sample
    prompts[1] = RLPrompt([Message.user(prompts[0].images[0], "Is there a red circle?")], source="x.json", index=1)
    calls, imgs = policy.encode_calls, policy.encoded_images
    _run(world, policy, tmp_path, "enc2.jsonl", judge=Recorder(lambda r: "A" if r.response_a < r.response_b else "B"),
         prompts=prompts)
    assert policy.encode_calls - calls == 3 and policy.encoded_images - imgs == 4   # [0, 1] share an image


def test_the_model_judges_itself(world, policy, tmp_path):
    judge = VLMJudge(policy, image_root=world / "data", max_new_tokens=4, batch_size=8)
    seen, answers = [], []

    def recording(reqs):
        out = judge(reqs)
        seen.extend(reqs)
        answers.extend(out)
        return out

    imgs = policy.encoded_images
    try:
        s, _ = _run(world, policy, tmp_path, "self.jsonl", judge=recording, cfg={"batch_size": N_PROMPTS})
    except DataError:   # a random-init judge rarely gives consistent verdicts
        s = json.loads((tmp_path / "self.jsonl.summary.json").read_text())
    verdicts = [parse_verdict(a) for a in answers]
    assert len(answers) == 2 * s["judged_pairs"] > 0
    assert s["unparsable"] == sum(v is None for v in verdicts)
    kept = sum((verdicts[k], verdicts[k + 1]) in (("A", "B"), ("B", "A")) for k in range(0, len(verdicts), 2))
    assert s["pairs"] == kept and s["inconsistent"] == s["judged_pairs"] - kept
    # sampling: the 4 prompt images in one call; judging: each generate batch of 8 judge prompts
    # encodes the distinct images it shows once (one prompt's requests are adjacent)
    keys = [r.record.images[0].key() for r in seen]
    want = sum(len(set(keys[b:b + 8])) for b in range(0, len(keys), 8))
    assert want < len(keys)
    assert policy.encoded_images - imgs == N_PROMPTS + want


def test_judge_prompt_and_template_checks(world):
    rec = RLPrompt([Message.system("be brief"), Message.user(ImageRef(path="images/train_00000.png"), "What is it?")],
                   reference="a red circle", source="f.json", index=7)
    ad = adapter_for(*build_tiny("llava"))
    judge = VLMJudge(ad, image_root=world / "data")
    msgs = judge.messages(JudgeRequest(rec, "one", "two"))
    assert len(msgs) == 1 and msgs[0].images == rec.images
    assert msgs[0].text == JUDGE_TEMPLATE.format(question="What is it?", response_a="one", response_b="two")
    custom = VLMJudge(ad, "Q {question} ref {reference}: 1) {response_a} 2) {response_b}? A or B", system="S")
    m = custom.messages(JudgeRequest(rec, "x", "y"))
    assert m[0].role == "system" and m[1].text == "Q What is it? ref a red circle: 1) x 2) y? A or B"
    with pytest.raises(DataError, match=r"f.json: record 7: field 'reference'"):
        custom.messages(JudgeRequest(RLPrompt(rec.prompt, None, source="f.json", index=7), "x", "y"))
    from_dir = VLMJudge(str(world / "model"))                  # a judge loaded from a model directory
    assert from_dir.adapter is not ad and from_dir.adapter.family == "llava"
    with pytest.raises(ConfigError, match="response_b"):
        VLMJudge(ad, "which: {response_a}?")
    with pytest.raises(ConfigError, match="{answer}"):
        VLMJudge(ad, "{answer} {response_a} {response_b}")


def test_settings_are_checked(world, policy, tmp_path):
    fake = Recorder(lambda r: "A")
    with pytest.raises(ConfigError, match=r"n: 1 is out of range \(must be >= 2\)"):
        _run(world, policy, tmp_path, judge=fake, cfg={"n": 1})
    with pytest.raises(ConfigError, match="exactly one"):
        _run(world, policy, tmp_path, judge=fake, reward_model=lambda x: torch.zeros(len(x)))
    with pytest.raises(ConfigError, match="best-of-n"):
        _run(world, policy, tmp_path, judge=fake, best_of_n_out=tmp_path / "b.jsonl")
    with pytest.raises(ConfigError, match="rm_pairs"):
        _run(world, policy, tmp_path, judge=fake, cfg={"rm_pairs": "top2"})


# ----------------------------------------------------------------------------- reward-model mode
def test_reward_model_best_vs_worst_follows_the_scores(world, policy, tmp_path):
    source = RewardModelSource(str(world / "rm"), image_root=world / "data", batch_size=8)
    best = tmp_path / "best.jsonl"
    s, out = _run(world, policy, tmp_path, "rm.jsonl", reward_model=source, best_of_n_out=best)
    pairs = read_file(out, kind="preference")
    assert s["mode"] == "reward_model" and s["pairs"] == len(pairs) == N_PROMPTS - s["ties"]
    assert s["ties"] == 0
    bests = read_file(best, kind="conversation")
    assert len(bests) == N_PROMPTS
    # re-score every prompt's distinct responses independently: chosen = argmax, rejected = argmin
    judge_free = Recorder(lambda r: "A" if r.response_a < r.response_b else "B")
    _run(world, policy, tmp_path, "same_samples.jsonl", judge=judge_free)   # same seed: same samples
    by_prompt: dict[int, set] = {}
    for r in judge_free.requests:
        by_prompt.setdefault(r.record.index, set()).update((r.response_a, r.response_b))
    recs = {r.index: r for r in _prompts(world)}
    for p, b in zip(pairs, bests):
        resp = sorted(by_prompt[p.meta["prompt_index"]])
        sc = source([RewardInput.from_record(recs[p.meta["prompt_index"]], x) for x in resp]).tolist()
        assert p.chosen == resp[max(range(len(sc)), key=sc.__getitem__)]
        assert p.rejected == resp[min(range(len(sc)), key=sc.__getitem__)]
        assert p.meta["scores"] == pytest.approx([max(sc), min(sc)], abs=1e-5)
        assert b.messages[-1].text == p.chosen and b.meta["score"] == pytest.approx(max(sc), abs=1e-5)
    assert source.stats()["scored"] > 0


class TableSource:
    """A fake reward source: scores looked up by response position within its prompt."""

    def __init__(self, scores):
        self.scores = scores
        self.seen = []

    def __call__(self, inputs):
        out = []
        for inp in inputs:
            key = inp.index
            k = sum(1 for x in self.seen if x.index == key)
            self.seen.append(inp)
            out.append(self.scores[key % len(self.scores)][k])
        return torch.tensor(out, dtype=torch.float32)


def test_best_each_and_ties_by_hand(world, policy, tmp_path):
    prompts = _prompts(world, 2)
    # prompt 0 (4 distinct responses r0..r3): scores 1, 3, 3, 0 -> best r1 (the first of the tied
    # 3s); best_each: r1>r2 tie (skipped), r1>r0, r1>r3 -> 2 pairs.
    # prompt 1: scores 2, 2, 2, 2 -> every comparison a tie: 3 ties, no pair
    src = TableSource([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    s, out = _run(world, policy, tmp_path, "each.jsonl", reward_model=src, prompts=prompts,
                  cfg={"rm_pairs": "best_each"})
    if s["unique"] != 8:
        pytest.skip("samples repeated: the table assumes 4 distinct responses per prompt")
    assert (s["pairs"], s["ties"]) == (2, 4)
    resp0 = [x.response for x in src.seen[:4]]
    pairs = read_file(out, kind="preference")
    assert [(p.chosen, p.rejected) for p in pairs] == [(resp0[1], resp0[0]), (resp0[1], resp0[3])]
    assert [p.meta["scores"] for p in pairs] == [[3.0, 1.0], [3.0, 0.0]]
    # best_worst: prompt 0 -> r1 vs r3; prompt 1 -> a tie
    src = TableSource([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    s, out = _run(world, policy, tmp_path, "worst.jsonl", reward_model=src, prompts=prompts)
    assert (s["pairs"], s["ties"]) == (1, 1)
    (p,) = read_file(out, kind="preference")
    assert (p.chosen, p.rejected) == (resp0[1], resp0[3])
    # a margin turns small differences into ties: 3 - 0 = 3 > 2.5 still a pair, 3 - 1 not
    src = TableSource([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    s, _ = _run(world, policy, tmp_path, "margin.jsonl", reward_model=src, prompts=prompts,
                cfg={"rm_pairs": "best_each", "tie_margin": 2.5})
    assert (s["pairs"], s["ties"]) == (1, 5)


# ----------------------------------------------------------------------------- prompts and paths
def test_prompts_from_any_kind():
    img = ImageRef(path="a.png")
    conv = Conversation([Message.system("sys"), Message.user(img, "What is it?"), Message.assistant("A cat."),
                         Message.user("And its colour?"), Message.assistant("Black.")], source="c.json", index=2)
    p = as_prompt(conv)
    assert [m.role for m in p.prompt] == ["system", "user"] and p.images == [img]
    assert p.reference == "A cat." and (p.source, p.index) == ("c.json", 2)
    pair = PreferencePair([Message.user(img, "Q?")], "yes", "no", source="p.json", index=0)
    assert as_prompt(pair).prompt == pair.prompt and as_prompt(pair).reference is None


def test_vqa_and_conversation_files_give_prompts(world):
    vqa = load_prompts(world / "data" / "vqa_eval.json", limit=3)
    conv = load_prompts(world / "data" / "vqa_train.json", limit=3)
    for p in vqa + conv:
        assert p.prompt[-1].role == "user" and len(p.images) == 1


def test_image_paths_outside_the_output_directory(world, policy, tmp_path):
    judge = Recorder(lambda r: "A" if r.response_a < r.response_b else "B")
    s, out = _run(world, policy, tmp_path, "elsewhere.jsonl", out_dir=tmp_path / "runs", judge=judge)
    root = str((world / "data").resolve())
    assert s["paths_relative_to"] == "image_root" and s["train"].endswith(f"data.image_root={root}")
    raw = json.loads(out.read_text().splitlines()[0])
    assert raw["prompt"][0]["content"][0]["image"].startswith("images/")
    cfg = DPOConfig()
    cfg.data.max_length = 512
    cfg.data.image_root = root                      # what the summary says to pass
    ex, _ = load_pairs(str(out), cfg, policy)
    assert len(ex) == s["pairs"]
    cfg.data.image_root = None                      # the default root (the file's folder) has no images
    with pytest.raises(DataError, match=r"elsewhere.jsonl: record 0: .*image file not found"):
        load_pairs(str(out), cfg, policy)
    # an image outside the image root is refused, naming the record
    bad = PreferencePair([Message.user(ImageRef(path="../x.png"), "Q?")], "a", "b", source="gen", index=3)
    with pytest.raises(DataError, match=r"gen: record 3: field 'image': .*escapes the image root"):
        relocate_images([bad], tmp_path / "o.jsonl", world / "data")


def test_output_inside_the_image_root_is_rewritten_relative_to_it(world, policy, tmp_path):
    sub = world / "data" / "images"
    judge = Recorder(lambda r: "A" if r.response_a < r.response_b else "B")
    s, out = _run(world, policy, tmp_path, "in_images.jsonl", out_dir=sub, judge=judge)
    assert s["paths_relative_to"] == "out_dir"
    raw = json.loads(out.read_text().splitlines()[0])
    assert raw["prompt"][0]["content"][0]["image"].startswith("train_")      # "images/" dropped
    cfg = DPOConfig()
    cfg.data.max_length = 512
    assert len(load_pairs(str(out), cfg, policy)[0]) == s["pairs"]           # no image_root needed
    out.unlink()


# ----------------------------------------------------------------------------- into DPO
def test_output_trains_dpo_directly(world, policy, tmp_path):
    judge = Recorder(lambda r: "A" if r.response_a < r.response_b else "B")
    s, out = _run(world, policy, tmp_path, "for_dpo.jsonl", judge=judge)
    cfg = load_config(DPOConfig, None, [
        f"model.path={world / 'model'}", f"data.train_file={out}", "data.max_length=512",
        f"train.output_dir={tmp_path / 'dpo'}", "train.max_steps=2", "train.batch_size=2", "train.progress=false",
        "optim.lr=1e-3", "optim.warmup_steps=0"], base=DPOConfig())
    result, adapter = train_dpo(cfg)
    assert result.step == 2 and (tmp_path / "dpo" / "checkpoints" / "step-2" / "model").is_dir()
    rows = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows if "train/loss" in r)


def _cli(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "vlmalign", *map(str, args)], env=env, capture_output=True,
                          text=True)


def test_cli_reward_model_then_train_dpo(world, tmp_path):
    data = world / "data"
    out = data / "cli_rm.jsonl"
    p = _cli("generate-preferences", "--model", world / "model", "--data", data / "rl_train.json", "--out", out,
             "--reward-model", world / "rm", "--n", 3, "--max-new-tokens", 6, "--limit", 3, "--seed", 1,
             "--best-of-n", tmp_path / "best.jsonl", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads((data / "cli_rm.summary.json").read_text())
    assert s["prompts"] == 3 and s["samples"] == 9 and s["pairs"] == len(read_file(out)) >= 1
    assert f"wrote {s['pairs']} pairs" in p.stdout and s["train"] in p.stdout
    assert len(read_file(tmp_path / "best.jsonl", kind="conversation")) == 3
    t = _cli("train", "dpo", f"model.path={world / 'model'}", f"data.train_file={out}", "data.max_length=512",
             "train.max_steps=1", "train.batch_size=2", "train.progress=false", f"train.output_dir={tmp_path / 'run'}")
    assert t.returncode == 0, t.stderr[-2000:]
    assert "done: 1 steps" in t.stdout


def test_cli_self_judge(world, tmp_path):
    data = world / "data"
    tpl = tmp_path / "judge.txt"
    tpl.write_text("Question: {question}\nFirst: {response_a}\nSecond: {response_b}\nBetter one, A or B?")
    summary = tmp_path / "self.summary.json"
    p = _cli("generate-preferences", "--model", world / "model", "--data", data / "rl_train.json",
             "--out", data / "cli_self.jsonl", "--n", 3, "--max-new-tokens", 6, "--limit", 2,
             "--judge-template", tpl, "--judge-max-new-tokens", 3, "--summary", summary, "--device", "cpu")
    s = json.loads(summary.read_text())
    assert s["mode"] == "judge" and s["judged_pairs"] > 0
    assert s["pairs"] + s["inconsistent"] == s["judged_pairs"]
    if s["pairs"]:   # a random-init judge rarely answers "A"/"B" consistently
        assert p.returncode == 0, p.stderr[-2000:]
    else:
        assert p.returncode == 2 and "no preference pairs were kept" in p.stderr
    bad = _cli("generate-preferences", "--model", world / "model", "--data", data / "rl_train.json",
               "--out", tmp_path / "x.jsonl", "--judge", world / "model", "--reward-model", world / "rm")
    assert bad.returncode == 2 and "either --judge or --reward-model" in bad.stderr


def test_cli_reward_function_ranks_by_the_function(world, tmp_path):
    """--reward-function: any reward function ranks the samples (the verifier route); here one
    importable from a module on the path, scoring the response length."""
    (tmp_path / "length_reward.py").write_text(
        "def longer(inputs):\n    return [float(len(i.response)) for i in inputs]\n")
    data = world / "data"
    out = tmp_path / "fn.jsonl"
    p = _cli("generate-preferences", "--model", world / "model", "--data", data / "captions_train.json",
             "--out", out, "--reward-function", "length_reward:longer", "--n", 3, "--max-new-tokens", 8,
             "--limit", 3, "--seed", 2, "--device", "cpu", env_extra={"PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0, p.stderr[-2000:]
    pairs = read_file(out)
    assert pairs and all(len(r.chosen) > len(r.rejected) for r in pairs)
    assert json.loads((tmp_path / "fn.summary.json").read_text())["mode"] == "reward_model"
    both = _cli("generate-preferences", "--model", world / "model", "--data", data / "rl_train.json",
                "--out", tmp_path / "x.jsonl", "--reward-model", world / "rm", "--reward-function", "caption_errors")
    assert both.returncode == 2 and "either --reward-model or --reward-function" in both.stderr
