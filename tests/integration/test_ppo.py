"""PPO with a critic (vlmalign train ppo): the critic's helpers by hand, then training runs on tiny
random-init LLaVA / Qwen2-VL models with ShapesWorld RL prompts."""

from __future__ import annotations

import math

import pytest
import torch

from vlmalign.methods.ppo_value import explained_variance, ppo_advantages, rows_of, sequence_kl, shape_scores


# ----------------------------------------------------------------------------- helpers by hand
def test_shape_scores_by_hand():
    scores = torch.tensor([1.0, 2.0, 0.5])
    finished = torch.tensor([True, False, True])
    lengths = torch.tensor([3, 5, 0])
    # s - 1.0 * [not finished] - 0.1 * n: 1 - 0 - 0.3 = 0.7; 2 - 1 - 0.5 = 0.5; 0.5 - 0 - 0 = 0.5
    out = shape_scores(scores, finished, lengths, missing_eos_penalty=1.0, length_penalty=0.1)
    assert torch.allclose(out, torch.tensor([0.7, 0.5, 0.5]))
    # no penalties: unchanged
    assert torch.equal(shape_scores(scores, finished, lengths), scores)
    with pytest.raises(ValueError, match="must all be"):
        shape_scores(scores, finished[:2], lengths)


def test_ppo_advantages_by_hand():
    # one row, two valid tokens and one padded (NaN there must not leak)
    logp = torch.tensor([[-1.0, -2.0, float("nan")]])
    ref = torch.tensor([[-1.5, -2.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, float("nan")]])
    mask = torch.tensor([[True, True, False]])
    score = torch.tensor([1.0])
    out = ppo_advantages(score, logp, ref, values, mask, kl_coef=0.1, gamma=1.0, lam=0.5, whiten=False)
    # k1 KL: logp - ref = [0.5, 0]; rewards = -0.1 * KL + score at the last token = [-0.05, 1.0]
    assert torch.allclose(out["rewards"], torch.tensor([[-0.05, 1.0, 0.0]]))
    # t=1: delta = 1.0 + 0 (no bootstrap) - 0.4 = 0.6 -> A1 = 0.6
    # t=0: delta = -0.05 + 0.4 - 0.2 = 0.15 -> A0 = 0.15 + 1 * 0.5 * 0.6 = 0.45
    assert torch.allclose(out["advantages"], torch.tensor([[0.45, 0.6, 0.0]]))
    # returns = A + V = [0.65, 1.0]
    assert torch.allclose(out["returns"], torch.tensor([[0.65, 1.0, 0.0]]))
    # whitened: mean 0.525, unbiased var ((-0.075)^2 + 0.075^2) / 1 = 0.01125, std 0.1061 -> -+0.7071
    w = ppo_advantages(score, logp, ref, values, mask, kl_coef=0.1, gamma=1.0, lam=0.5, whiten=True)
    assert torch.allclose(w["advantages"], torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]]), atol=1e-5)
    assert torch.allclose(w["returns"], out["returns"])  # the critic's targets are never whitened


def test_explained_variance_and_sequence_kl_by_hand():
    returns = torch.tensor([[1.0, 2.0], [3.0, 9.0]])
    values = torch.tensor([[1.0, 2.0], [2.0, float("nan")]])
    mask = torch.tensor([[True, True], [True, False]])
    # valid R = 1, 2, 3 (var 1); R - V = 0, 0, 1 (mean 1/3, squares 1/9 + 1/9 + 4/9 = 2/3, / 2 = 1/3)
    assert explained_variance(values, returns, mask) == pytest.approx(1 - 1 / 3)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert math.isnan(explained_variance(values, torch.ones(2, 2), mask))     # returns do not vary
    logp = torch.tensor([[-1.0, -2.0], [-0.5, float("-inf")]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, 0.0]])
    # row 0: 0.5 + (-1.0) = -0.5; row 1: 0 (the padded -inf is not read)
    assert sequence_kl(logp, ref, mask).tolist() == [-0.5, 0.0]
    x = torch.arange(12.0).view(3, 4)
    assert rows_of(x, [2, 0], 2).tolist() == [[8.0, 9.0], [0.0, 1.0]]


# ----------------------------------------------------------------------------- training runs
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld  # noqa: E402
from vlmalign.errors import ModelError, VlmalignError  # noqa: E402
from vlmalign.methods.ppo import PPOMethod, PPOConfig, train_ppo# noqa: E402
from vlmalign.models import ScalarModel, adapter_for, build_tiny  # noqa: E402
from vlmalign.models.adapter import VLMAdapter  # noqa: E402
from vlmalign.rewards import CombinedReward, FunctionReward  # noqa: E402

EVERY_METRIC = ("reward", "kl", "kl_rollout", "entropy", "clipfrac", "value_loss", "explained_variance",
                "response_length", "policy_loss", "score", "value_mean", "return_mean", "vf_clipfrac")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo") / "data"
    generate_shapesworld(root, ShapesConfig(seed=2, train_images=16, eval_images=6))
    return root


def chars(inputs):
    """A seeded, quickly learnable length-style reward: characters in the response / 30."""
    return [len(i.response) / 30 for i in inputs]


def chars_reward():
    return CombinedReward([(FunctionReward(chars, name="chars"), 1.0)])


def _cfg(data, out, family="llava", **over):
    cfg = PPOConfig()
    cfg.model.tiny = family
    cfg.data.train_file = str(data / "rl_train.json")
    cfg.data.max_length = 128
    cfg.train.output_dir = str(out)
    cfg.train.max_steps = 1
    cfg.train.progress = False
    cfg.train.batch_size = 4
    cfg.rollout.prompts_per_step = 2
    cfg.rollout.k = 2
    cfg.rollout.max_new_tokens = 5
    cfg.update.epochs = 2
    cfg.optim.lr = 1e-3
    cfg.value.lr = 1e-3
    for key, v in over.items():
        sect, name = key.split("__")
        setattr(getattr(cfg, sect), name, v)
    return cfg


def _start(cfg):
    """The starting policy (as train_ppo builds it) and a PPO method for it."""
    from vlmalign.methods.setup import build_adapter, seed_everything
    seed_everything(cfg.train.seed)
    ad = build_adapter(cfg.model, seed=cfg.train.seed, lora_cfg=cfg.lora)
    return ad, PPOMethod(cfg, ad)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_one_iteration_updates_policy_and_critic_and_logs_every_metric(data, tmp_path):
    cfg = _cfg(data, tmp_path / "run", data__eval_file=str(data / "rl_eval.json"))
    ad, method = _start(cfg)
    pol0, val0 = _snapshot(ad.model), _snapshot(method.value_model)
    result, ad2 = train_ppo(cfg, adapter=ad, reward=chars_reward(), method=method)
    assert ad2 is ad and result.step == 1
    groups = ad.param_groups()
    lang = {n for g in ("language", "head") for n, _ in groups[g]}
    frozen = {n for g in ("vision", "projector") for n, _ in groups[g]}
    pol1, val1 = _snapshot(ad.model), _snapshot(method.value_model)
    moved = {n for n in pol0 if not torch.equal(pol0[n], pol1[n])}
    assert moved and moved <= lang and not (moved & frozen)
    # the critic: its head and language model learned; its tower, projector and LM head did not
    vmoved = {n for n in val0 if not torch.equal(val0[n], val1[n])}
    assert "head.weight" in vmoved and any(n.startswith("base.model.language_model") for n in vmoved)
    assert all(not n.startswith(("base.model.vision_tower", "base.model.multi_modal_projector", "base.lm_head"))
               for n in vmoved)
    # policy and critic share no tensor
    assert not {p.data_ptr() for p in ad.model.parameters()} & {p.data_ptr() for p in method.value_model.parameters()}
    rows = _metrics(cfg.train.output_dir)
    train = [r for r in rows if "train/reward" in r]
    assert len(train) == 1
    for m in EVERY_METRIC:
        assert math.isfinite(train[0][f"train/{m}"]), m
    # KL 0 at the start: the rollout policy is the reference before any update
    assert train[0]["train/kl_rollout"] == 0.0
    first_eval = rows[0]
    assert first_eval["step"] == 0 and first_eval["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    assert "eval/reward" in rows[-1] and rows[-1]["step"] == 1
    assert train[0]["train/updates"] == 2          # 2 epochs x 1 minibatch
    assert (Path(cfg.train.output_dir) / "training.png").exists()
    ck = Path(result.checkpoint)
    saved = load_file(str(ck / "value_model.safetensors"))
    assert "head__weight" in saved and torch.equal(saved["head__weight"], method.value_model.head.weight.detach())
    assert not any("vision_tower" in k for k in saved)                 # only what the critic trains


def test_critic_warmup_leaves_the_policy_unchanged(data, tmp_path):
    cfg = _cfg(data, tmp_path / "run", train__max_steps=3, train__save_every=1, train__keep_last=3,
               value__warmup_iterations=2)
    ad, method = _start(cfg)
    pol0, head0 = _snapshot(ad.model), method.value_model.head.weight.detach().clone()
    heads = []
    orig = method.optimizer_step

    def spy(loop):
        orig(loop)
        heads.append((loop.step, method.value_model.head.weight.detach().clone()))
    method.optimizer_step = spy
    train_ppo(cfg, adapter=ad, reward=chars_reward(), method=method)
    from vlmalign.models import load_adapter
    ck = Path(cfg.train.output_dir) / "checkpoints"
    for step, same in ((1, True), (2, True), (3, False)):
        w = dict(load_adapter(str(ck / f"step-{step}" / "model")).model.named_parameters())
        assert w.keys() == pol0.keys()
        assert all(torch.equal(w[n], pol0[n]) for n in pol0) is same, step
    # the critic learned in every step, warm-up included (2 updates per step)
    assert [s for s, _ in heads] == [0, 0, 1, 1, 2, 2]
    assert not torch.equal(heads[0][1], head0) and not torch.equal(heads[3][1], heads[1][1])
    train = [r for r in _metrics(cfg.train.output_dir) if "train/reward" in r]
    assert [r["train/critic_warmup"] for r in train] == [1.0, 1.0, 0.0]
    assert "train/clipfrac" not in train[0] and "train/clipfrac" in train[2]


def _save_reward_model(family, path, seed=1):
    """A tiny reward model directory (a ScalarModel over another random-init model of ``family``:
    same tokenizer, other weights, so its image features differ from the policy's)."""
    model, processor = build_tiny(family, seed=seed)
    rm = ScalarModel(adapter_for(model, processor), kind="reward", seed=seed + 10)
    rm.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return rm


def _count_encodes(monkeypatch):
    calls = []
    orig = VLMAdapter.encode_images

    def counted(self, items, **kw):
        calls.append((id(self), len(items)))
        return orig(self, items, **kw)
    monkeypatch.setattr(VLMAdapter, "encode_images", counted)
    return calls


def test_value_model_from_a_reward_model_dir_vs_from_the_policy(data, tmp_path, monkeypatch):
    rm = _save_reward_model("llava", tmp_path / "rm")
    cfg = _cfg(data, tmp_path / "a", train__max_steps=2, value__init="reward_model", value__path=str(tmp_path / "rm"))
    ad, method = _start(cfg)
    vm = method.value_model
    assert vm.kind == "value" and torch.equal(vm.head.weight, rm.head.weight) and torch.equal(vm.head.bias, rm.head.bias)
    rm_lang = dict(rm.adapter.param_groups()["language"])
    assert all(torch.equal(p, rm_lang[n]) for n, p in vm.adapter.param_groups()["language"])
    assert method.share is False          # another vision tower: the critic encodes images itself
    calls = _count_encodes(monkeypatch)
    train_ppo(cfg, adapter=ad, reward=chars_reward(), method=method)
    by = {}
    for who, _ in calls:
        by[who] = by.get(who, 0) + 1
    assert by == {id(ad): 2, id(vm.adapter): 2}     # once per step each: the rollout's, the critic's

    # from the policy: a copy of the starting policy, a new head, the rollout's image features
    calls.clear()
    cfg2 = _cfg(data, tmp_path / "b", train__max_steps=2)
    ad2, m2 = _start(cfg2)
    v2 = m2.value_model
    assert m2.share is True and not torch.equal(v2.head.weight, rm.head.weight)
    pol = dict(ad2.model.named_parameters())
    assert all(torch.equal(p, pol[n]) for n, p in v2.adapter.model.named_parameters())
    train_ppo(cfg2, adapter=ad2, reward=chars_reward(), method=m2)
    assert {who for who, _ in calls} == {id(ad2)} and len(calls) == 2

    # the critic reads the policy's token ids: another family is refused
    _save_reward_model("qwen2_vl", tmp_path / "rm_qwen")
    bad = _cfg(data, tmp_path / "c", value__init="reward_model", value__path=str(tmp_path / "rm_qwen"))
    with pytest.raises(ModelError, match="same tokenizer"):
        _start(bad)
    with pytest.raises(VlmalignError, match="needs value.path"):
        _start(_cfg(data, tmp_path / "d", value__init="reward_model"))


def test_images_encoded_once_per_prompt_group(data, tmp_path, monkeypatch):
    # 3 prompts x k=4 samples per step, 2 PPO epochs of 2 minibatches: the rollout encodes each
    # step's unique images once; old log-probs, reference, critic values and every update reuse them
    cfg = _cfg(data, tmp_path / "run", train__max_steps=2, rollout__prompts_per_step=3, rollout__k=4,
               update__minibatch_size=6)
    ad, method = _start(cfg)
    calls = _count_encodes(monkeypatch)
    train_ppo(cfg, adapter=ad, reward=chars_reward(), method=method)
    assert len(calls) == 2 and all(who == id(ad) and 1 <= n <= 3 for who, n in calls)
    assert ad.encode_calls == 2 and method.value_model.adapter.encode_calls == 0
    train = [r for r in _metrics(cfg.train.output_dir) if "train/reward" in r]
    assert [r["train/updates"] for r in train] == [4, 4]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_reward_model_driven_ppo(family, data, tmp_path):
    """The reward is a reward model (type: model) and the critic starts from it."""
    _save_reward_model(family, tmp_path / "rm")
    cfg = _cfg(data, tmp_path / "run", family=family, train__max_steps=2, value__init="reward_model",
               value__path=str(tmp_path / "rm"))
    cfg.reward = [{"type": "model", "path": str(tmp_path / "rm"), "weight": 1.0, "empty_score": 0.0}]
    ad, method = _start(cfg)
    val0 = _snapshot(method.value_model)
    result, _ = train_ppo(cfg, adapter=ad, method=method)
    assert result.step == 2 and ad.family == family
    train = [r for r in _metrics(cfg.train.output_dir) if "train/reward" in r]
    assert len(train) == 2
    for r in train:
        assert r["train/reward"] == pytest.approx(r["train/reward/model"]) and r["train/reward/model/scored"] > 0
        assert math.isfinite(r["train/value_loss"]) and math.isfinite(r["train/explained_variance"])
    assert any(not torch.equal(val0[n], p) for n, p in method.value_model.named_parameters())


def test_ppo_raises_held_out_reward(data, tmp_path):
    """A seeded, quickly learnable reward (characters per response) rises on held-out prompts
    over the starting model's, with KL and reward curves in the run dir."""
    cfg = _cfg(data, tmp_path / "run", data__eval_file=str(data / "rl_eval.json"), train__max_steps=15,
               train__eval_every=5, train__batch_size=16, rollout__prompts_per_step=4, rollout__k=4,
               rollout__max_new_tokens=6, update__epochs=4, optim__lr=1e-2, value__lr=1e-2,
               value__warmup_iterations=2, kl__coef=0.01)
    train_ppo(cfg, reward=chars_reward())
    rows = _metrics(cfg.train.output_dir)
    ev = [(r["step"], r["eval/reward"]) for r in rows if "eval/reward" in r]
    assert [s for s, _ in ev] == [0, 5, 10, 15]
    # measured (seed 0): held-out greedy reward 0.42 at the start, 1.37 after 15 steps
    assert ev[-1][1] > ev[0][1] + 0.3
    train = [r for r in rows if "train/reward" in r]
    first = sum(r["train/reward"] for r in train[:3]) / 3
    last = sum(r["train/reward"] for r in train[-3:]) / 3
    assert last > first + 0.2
    assert train[0]["train/kl_rollout"] == 0.0 and train[-1]["train/kl_rollout"] > 0.0
    assert (Path(cfg.train.output_dir) / "training.png").exists()


def test_resume_matches_uninterrupted(data, tmp_path):
    def run(out, steps, resume=False):
        cfg = _cfg(data, out, train__max_steps=steps, train__resume=resume, optim__schedule="constant")
        ad, method = _start(cfg)
        train_ppo(cfg, adapter=ad, reward=chars_reward(), method=method)
        return ad, method, [r for r in _metrics(out) if "train/reward" in r]

    ad_full, m_full, rows_full = run(tmp_path / "full", 3)
    run(tmp_path / "part", 2)
    ad_res, m_res, rows_res = run(tmp_path / "part", 3, resume=True)
    for a, b in ((ad_full.model, ad_res.model), (m_full.value_model, m_res.value_model)):
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        assert max((pa[n] - pb[n]).abs().max().item() for n in pa) <= 1e-6
    assert len(rows_res) == 3
    for key in ("train/reward", "train/value_loss", "train/policy_loss", "train/kl_rollout"):
        assert rows_res[-1][key] == pytest.approx(rows_full[-1][key], abs=1e-6)


def test_cli_lora_policy_with_its_own_lora_critic(data, tmp_path):
    from vlmalign.cli.main import main
    out = tmp_path / "run"
    rc = main(["train", "ppo", "model.tiny=llava", f"data.train_file={data / 'rl_train.json'}", "data.max_length=128",
               f"train.output_dir={out}", "train.max_steps=1", "train.progress=false", "train.batch_size=4",
               "rollout.prompts_per_step=2", "rollout.k=2", "rollout.max_new_tokens=4", "lora.enabled=true",
               "lora.r=4", "update.epochs=2", "ppo.missing_eos_penalty=1.0", "optim.lr=1e-3"])
    assert rc == 0
    ck = out / "checkpoints" / "step-1"
    assert (ck / "model" / "adapter_model.safetensors").exists()
    saved = load_file(str(ck / "value_model.safetensors"))
    assert any("lora_A" in k for k in saved) and "head__weight" in saved
    assert not any("lora" not in k and k != "head__weight" and k != "head__bias" for k in saved)
    (train,) = [r for r in _metrics(out) if "train/reward" in r]
    # a response that hit the 4-token budget without a stop token scores its reward minus 1; the
    # random model finishes few (here 1 of 4): mean score = mean reward - (1 - finished share)
    assert train["train/finished"] < 1.0
    assert train["train/score"] == pytest.approx(train["train/reward"] - (1.0 - train["train/finished"]), abs=1e-6)
    assert train["train/kl_rollout"] == 0.0
