"""GRPO / Dr. GRPO / RLOO / REINFORCE++ through the online-RL loop on tiny random-init models with
ShapesWorld RL prompts: updates and metrics, encode-once counting, advantages as losses/rl.py
computes them, KL to the reference, micro-batching, resume, learning, LoRA, Qwen2-VL, errors."""

from __future__ import annotations

import logging
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmalign.config import ConfigError, load_config
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.engine.trainer import NonFiniteLossError
from vlmalign.errors import DataError, VlmalignError
from vlmalign.losses.rl import expand_to_tokens, group_advantages, reinforce_pp_advantages, rloo_advantages
from vlmalign.methods.grpo import GRPOConfig, GRPOMethod, train_grpo
from vlmalign.engine.online import OnlineTrainer
from vlmalign.models import VLMAdapter, build_tiny, load_adapter, save_tiny

ROOT = Path(__file__).resolve().parents[2]
# 1 when the response holds a digit: a random tiny model emits one in about a third of its
# 6-token samples, so groups have reward variance, and it can learn to emit more
DIGIT = "reward=[{type: function, name: format, args: {pattern: '[0-9]', mode: search}}]"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    generate_shapesworld(root / "data", ShapesConfig(seed=1, train_images=6, eval_images=2))
    save_tiny("llava", str(root / "model"))
    return root


def _cfg(world, out, *extra):
    return load_config(GRPOConfig, None, [
        f"model.path={world / 'model'}", f"data.train_file={world / 'data' / 'rl_train.json'}",
        "data.max_length=256", f"train.output_dir={out}", "train.max_steps=1", "train.progress=false",
        "rollout.prompts_per_step=3", "rollout.k=4", "rollout.max_new_tokens=6", "train.batch_size=12",
        "optim.lr=1e-3", DIGIT, *extra], base=GRPOConfig())


def _metrics(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _weights(out, step) -> dict:
    return load_file(str(Path(out) / "checkpoints" / f"step-{step}" / "model" / "model.safetensors"))


def test_one_step_updates_the_policy_and_logs_the_metrics(world, tmp_path):
    out = tmp_path / "run"
    before = {k: v.clone() for k, v in load_adapter(str(world / "model")).model.state_dict().items()}
    result, ad = train_grpo(_cfg(world, out, f"data.eval_file={world / 'data' / 'rl_eval.json'}"))
    assert result.step == 1
    after = ad.model.state_dict()
    groups = ad.param_groups()
    for g in ("vision", "projector"):   # frozen by the GRPO defaults
        for name, _ in groups[g]:
            assert torch.equal(after[name], before[name]), f"frozen {name} changed"
    moved = [n for n, _ in groups["language"] if not torch.equal(after[n], before[n])]
    assert len(moved) > len(groups["language"]) // 2
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 1]       # eval before training, the step, final eval
    train = rows[1]
    for key in ("reward", "reward_std", "reward/format", "kl", "entropy", "clipfrac", "response_length",
                "zero_std_groups", "finished", "policy_loss", "kl_loss", "loss", "grad_norm"):
        assert f"train/{key}" in train, key
    assert 0 < train["train/reward"] < 1 and train["train/reward_std"] > 0
    assert train["train/reward"] == train["train/reward/format"]      # the only source, weight 1
    # random model: few responses stop before the 6-token budget
    assert train["train/finished"] < 1 and train["train/response_length"] <= 6
    assert train["train/finished"] > 0 or train["train/response_length"] == 6
    assert 0 <= train["train/zero_std_groups"] <= 1
    # entropy of a random tiny model is close to log(vocabulary size)
    assert abs(train["train/entropy"] - torch.log(torch.tensor(float(len(ad.tokenizer)))).item()) < 0.1
    for r in (rows[0], rows[2]):
        assert {"eval/reward", "eval/reward/format", "eval/kl", "eval/response_length"} <= set(r)
    assert (out / "training.png").stat().st_size > 1000 and (out / "config.yaml").exists()
    reloaded = load_adapter(str(out / "checkpoints" / "step-1" / "model"))
    for k, v in reloaded.model.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_images_are_encoded_once_per_prompt_group(world, tmp_path, monkeypatch):
    calls = []
    real = VLMAdapter.encode_images

    def counting(self, items, **kw):
        calls.append(len(items))
        return real(self, items, **kw)

    monkeypatch.setattr(VLMAdapter, "encode_images", counting)
    # old log-probs recomputed, a reference forward, two epochs of three minibatches, micro-batches
    # of 2 rows: every forward of the step reads the features computed at sampling time
    train_grpo(_cfg(world, tmp_path / "run", "train.max_steps=2", "update.old_logprobs=recompute",
                    "update.epochs=2", "update.minibatch_size=4", "train.batch_size=2"))
    assert calls == [3, 3]      # per step: one call, one encoding per prompt (not per k samples)
    # a trainable projector needs gradients through the features: encoded again per micro-batch
    calls.clear()
    train_grpo(_cfg(world, tmp_path / "proj", "model.train_projector=true", "train.batch_size=6"))
    assert len(calls) > 1 and calls[0] == 3


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_entropy_and_eval_kl_read_the_output_head(world, family):
    """The entropy metric and the exact eval KL apply the output head to the final hidden
    states: that must reproduce the forward's log-probs, and the entropy must be -sum p log p of
    the temperature-scaled distribution on valid tokens only."""
    from vlmalign.data.batching import ImageLoader
    from vlmalign.data.readers import read_file
    from vlmalign.models import adapter_for
    from vlmalign.rollout import SamplingConfig, rollout, sequence_logprobs
    model, proc = build_tiny(family)
    with torch.no_grad():   # a peaked distribution, far from uniform
        model.get_output_embeddings().weight.mul_(20)
    ad = adapter_for(model.eval(), proc)
    recs = read_file(world / "data" / "rl_train.json", kind="rl_prompt")[:3]
    b = rollout(ad, recs, ImageLoader(ad, world / "data"), SamplingConfig(max_new_tokens=5, temperature=0.7), k=2,
                seed=0)
    lp, h = sequence_logprobs(ad, b, encoded=b.encoded, return_hidden=True)
    full = torch.log_softmax(OnlineTrainer.head_logits(ad, h, 0.7), dim=-1)       # (R, T, V)
    picked = full.gather(-1, b.response_ids.unsqueeze(-1)).squeeze(-1)
    assert (picked - lp)[b.response_mask].abs().max() < 1e-5
    m = b.response_mask.clone()
    m[0, 2:] = False                        # rows that stopped early: their padding is left out
    m[3, 1:] = False
    want = -(full.exp() * full).sum(-1)[m].mean()
    assert abs(want - -(full.exp() * full).sum(-1).mean()) > 1e-3   # the mask matters here
    got = OnlineTrainer.entropy(ad, h, m, 0.7)
    assert abs(got.item() - want.item()) < 1e-4 and 0.05 < want.item() < 5.0


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_advantages_and_loss_follow_losses_rl(world, tmp_path, monkeypatch, estimator):
    seen = {}
    real = GRPOMethod.advantages

    def spy(self, loop, batch, data):
        out = real(self, loop, batch, data)
        seen.update(batch=batch, scores=data["scores"].clone(), adv=data["advantages"].clone())
        return out

    monkeypatch.setattr(GRPOMethod, "advantages", spy)
    out = tmp_path / estimator
    train_grpo(_cfg(world, out, f"grpo.estimator={estimator}", "kl.coef=0"))
    b, scores, adv = seen["batch"], seen["scores"], seen["adv"]
    mask, k = b.response_mask, 4
    # the rewards are the recipe's function on the decoded responses
    assert scores.tolist() == [1.0 if re.search("[0-9]", t) else 0.0 for t in b.texts]
    assert 0 < scores.sum() < len(scores)
    expected = {"grpo": lambda: expand_to_tokens(group_advantages(scores, k), mask),
                "dr_grpo": lambda: expand_to_tokens(group_advantages(scores, k, scale_std=False), mask),
                "rloo": lambda: expand_to_tokens(rloo_advantages(scores, k), mask),
                "reinforce_pp": lambda: reinforce_pp_advantages(scores, mask)}[estimator]()
    assert torch.allclose(adv, expected, atol=1e-6)
    assert adv.abs().sum() > 0
    # one update per rollout: ratio 1, so the logged policy loss is -aggregate(A) with the
    # estimator's aggregation (n = response lengths, B rows, L = max_new_tokens = 6)
    a = adv[:, 0]
    n = mask.sum(1).float()
    want = {"grpo": -a.mean(),                                     # seq_mean_token_mean
            "dr_grpo": -(a * n).sum() / (len(a) * 6),              # token_sum_norm
            "rloo": -(a * n).sum() / n.sum(),                      # token_mean
            "reinforce_pp": -(adv * mask).sum() / n.sum()}[estimator]
    got = _metrics(out)[0]["train/policy_loss"]
    assert abs(got - want.item()) < 1e-6, (got, want)


def test_kl_is_zero_while_the_policy_equals_the_reference(world, tmp_path):
    out = tmp_path / "kl"
    train_grpo(_cfg(world, out, "train.max_steps=2", f"data.eval_file={world / 'data' / 'rl_eval.json'}"))
    rows = _metrics(out)
    assert rows[0]["step"] == 0 and rows[0]["eval/kl"] == 0.0
    assert rows[1]["step"] == 1 and rows[1]["train/kl"] == 0.0 and rows[1]["train/kl_loss"] == 0.0
    assert rows[2]["step"] == 2 and rows[2]["train/kl"] > 0
    assert rows[-1]["eval/kl"] > 0


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_micro_batches_give_the_one_batch_update(world, tmp_path, estimator):
    # Adam's eps 1e-4 (as in test_rl_processes.py): with 1e-8, Adam divides an entry's float-rounding
    # difference by sqrt(v), and an entry whose gradient is ~0 moves by up to lr either way
    # (micro-batches of 5 split the groups of 4, so the prefix-shared forwards round differently)
    a, _ = train_grpo(_cfg(world, tmp_path / "a", "train.max_steps=2", f"grpo.estimator={estimator}", "optim.eps=1e-4"))
    b, _ = train_grpo(_cfg(world, tmp_path / "b", "train.max_steps=2", f"grpo.estimator={estimator}",
                           "train.batch_size=5", "optim.eps=1e-4"))
    wa, wb = _weights(tmp_path / "a", 2), _weights(tmp_path / "b", 2)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    for key in ("loss", "reward", "kl", "entropy"):
        assert abs(a.metrics[key] - b.metrics[key]) < 1e-5, key


class _Crash(Exception):
    pass


def test_resume_matches_an_uninterrupted_run(world, tmp_path, monkeypatch):
    common = ["train.max_steps=4", "train.save_every=1", "train.keep_last=10", "optim.schedule=cosine",
              "optim.warmup_steps=1", "update.epochs=2", "update.minibatch_size=6", "train.batch_size=3"]
    full = tmp_path / "full"
    train_grpo(_cfg(world, full, *common))
    real = OnlineTrainer.train_step

    def crash(self):
        if self.step == 2:
            raise _Crash()
        return real(self)

    cut = tmp_path / "cut"
    monkeypatch.setattr(OnlineTrainer, "train_step", crash)
    with pytest.raises(_Crash):
        train_grpo(_cfg(world, cut, *common))
    monkeypatch.undo()
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-1", "step-2"]
    train_grpo(_cfg(world, cut, *common, "train.resume=true"))
    wa, wb = _weights(full, 4), _weights(cut, 4)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-6, k
    ra, rb = _metrics(full), _metrics(cut)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        for key in ("train/reward", "train/loss", "train/kl", "lr"):
            assert abs(x[key] - y[key]) <= 1e-6, (key, x[key], y[key])


def test_held_out_reward_rises(world, tmp_path):
    out = tmp_path / "learn"
    result, _ = train_grpo(_cfg(world, out, "train.max_steps=20", "rollout.k=8", "train.batch_size=24",
                                "optim.lr=3e-3", f"data.eval_file={world / 'data' / 'rl_eval.json'}"))
    rows = _metrics(out)
    before = rows[0]["eval/reward"]
    after = result.metrics["eval/reward"]
    assert before < 1 and after > before, (before, after)
    train = [r["train/reward"] for r in rows if "train/reward" in r]
    assert len(train) == 20 and sum(train[-5:]) / 5 > sum(train[:5]) / 5 + 0.2, train


def test_lora_policy_with_the_adapter_disabled_reference(world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vlmalign")
    out = tmp_path / "lora"
    base = {k: v.clone() for k, v in load_adapter(str(world / "model")).model.state_dict().items()}
    result, ad = train_grpo(_cfg(world, out, "lora.enabled=true", "lora.r=4", "train.max_steps=2"))
    assert "reference: the policy with its LoRA adapters disabled" in caplog.text
    state = ad.model.state_dict()
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b and any(state[k].abs().sum() > 0 for k in lora_b)      # B starts at 0
    for k, v in state.items():
        if "lora_" not in k:
            plain = k.replace(".base_layer", "")
            assert torch.equal(v, base[plain]), f"base weight {k} changed"
    rows = _metrics(out)
    assert rows[0]["train/kl"] == 0.0 and rows[1]["train/kl"] > 0
    assert (out / "checkpoints" / "step-2" / "model" / "adapter_model.safetensors").exists()


def test_qwen2_vl_runs_a_step(world, tmp_path):
    before = {k: v.clone() for k, v in build_tiny("qwen2_vl")[0].state_dict().items()}
    cfg = _cfg(world, tmp_path / "qwen", "model.path=null", "model.tiny=qwen2_vl")
    result, ad = train_grpo(cfg)
    assert ad.family == "qwen2_vl" and result.step == 1
    after = ad.model.state_dict()
    assert any(not torch.equal(after[n], before[n]) for n, _ in ad.param_groups()["language"])
    for n, _ in ad.param_groups()["vision"]:
        assert torch.equal(after[n], before[n])
    row = _metrics(tmp_path / "qwen")[0]
    assert row["train/kl"] == 0.0 and 0 < row["train/reward"] < 1


def test_the_cli_runs_the_quickstart_recipe(world, tmp_path):
    from vlmalign.cli.main import main
    out = tmp_path / "cli"
    rc = main(["train", "grpo", "--config", str(ROOT / "recipes" / "quickstart" / "grpo.yaml"),
               f"model.path={world / 'model'}", f"data.train_file={world / 'data' / 'rl_train.json'}",
               f"data.eval_file={world / 'data' / 'rl_eval.json'}", f"train.output_dir={out}",
               "train.max_steps=1", "rollout.prompts_per_step=2", "rollout.k=2", "train.progress=false",
               "eval.tasks=[]"])   # the recipe's benchmark files are not in this test's data
    assert rc == 0
    rows = _metrics(out)
    assert "train/reward/exact_match" in rows[1] and "eval/reward" in rows[-1]


def test_a_non_finite_loss_stops_the_run(world, tmp_path, monkeypatch):
    real = GRPOMethod.loss
    calls = {"n": 0}

    def poisoned(self, *a):
        calls["n"] += 1
        loss, st = real(self, *a)
        return (loss * float("nan"), st) if calls["n"] == 2 else (loss, st)

    monkeypatch.setattr(GRPOMethod, "loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 2.*step-1"):
        train_grpo(_cfg(world, out, "train.max_steps=3", "train.save_every=1"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]


def test_bad_settings_and_records_are_refused(world, tmp_path):
    with pytest.raises(VlmalignError, match="rollout.k must be >= 2"):
        train_grpo(_cfg(world, tmp_path / "a", "rollout.k=1"))
    with pytest.raises(VlmalignError, match="train.grad_accum does not apply"):
        train_grpo(_cfg(world, tmp_path / "b", "train.grad_accum=2"))
    with pytest.raises(VlmalignError, match=r"update.minibatch_size \(13\) exceeds"):
        train_grpo(_cfg(world, tmp_path / "c", "update.minibatch_size=13"))
    with pytest.raises(VlmalignError, match=r"data.max_length \(6\) must exceed"):
        train_grpo(_cfg(world, tmp_path / "d", "data.max_length=6"))
    with pytest.raises(ConfigError, match=r"reward\[0\]: unknown key 'nme'.*did you mean 'name'"):
        train_grpo(_cfg(world, tmp_path / "e", "reward=[{type: function, nme: exact_match}]"))
    data = json.loads((world / "data" / "rl_train.json").read_text())
    data[2]["image"] = "images/missing.png"
    bad = world / "data" / "bad_rl.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"bad_rl.json: record 2: .*image file not found"):
        train_grpo(_cfg(world, tmp_path / "f", f"data.train_file={bad}"))
