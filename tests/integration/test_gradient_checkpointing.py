"""``model.gradient_checkpointing=true`` really recomputes activations, and changes nothing else:
for every family (SFT) and for every method (on LLaVA: pretrain, sft, rm, dpo, kto, grpo, ppo),
a one-step run with it logs the same metrics and leaves the same weights as one without.

"Really recomputes" is counted, not assumed: every Linear inside a decoder layer
(transformers' ``GradientCheckpointingLayer``) counts its forward calls, and with checkpointing
the backward pass calls them again."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from vlmalign.config import load_config
from vlmalign.methods.registry import get
from vlmalign.methods.setup import build_adapter
from vlmalign.models import families

METHODS = ("pretrain", "sft", "rm", "dpo", "kto", "grpo", "ppo")
# each method's training file and the settings that keep its one step small. Checkpointing turns
# prefix sharing off (DPO's, KTO's, and GRPO's / PPO's in sampling and updates: the model returns no
# key/value cache in training, see methods/logps.py), so both runs take the unshared path: AdamW's
# first step, about lr * sign(g), would turn the float rounding between the two paths into weight
# differences of 2 * lr, and the shared path's extra forwards would upset the call count.
UNSHARED_RL = ["update.prefix_sharing=false", "rollout.prefix_sharing=false"]
DATA = {
    "pretrain": ["data.train_file={d}/captions_train.json"],
    "sft": ["data.train_file={d}/vqa_train.json"],
    "rm": ["data.train_file={d}/dpo_train.json"],
    "dpo": ["data.train_file={d}/dpo_train.json", "dpo.ref_cache_dir={out}/ref_cache", "dpo.prefix_sharing=false"],
    "kto": ["data.train_file={d}/kto_train.jsonl", "kto.ref_cache_dir={out}/ref_cache", "kto.prefix_sharing=false"],
    "grpo": ["data.train_file={d}/rl_train.json", "rollout.prompts_per_step=2", "rollout.k=2",
             "rollout.max_new_tokens=3", *UNSHARED_RL],
    "ppo": ["data.train_file={d}/rl_train.json", "rollout.prompts_per_step=2", "rollout.k=2",
            "rollout.max_new_tokens=3", *UNSHARED_RL],
}


@pytest.fixture(scope="module")
def world(shapes_llava):
    return shapes_llava


def _count_layer_linears(model) -> list[int]:
    """A counter of forward calls of every Linear inside a decoder layer of ``model``."""
    calls = [0]
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def _one_step(method: str, out: Path, sets: list[str], ckpt: bool):
    cfg = load_config(get(method).config, None, [
        *sets, "data.max_length=512", f"train.output_dir={out}", "train.max_steps=1", "train.batch_size=2",
        "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant",
        f"model.gradient_checkpointing={str(ckpt).lower()}"])
    adapter = build_adapter(cfg.model, seed=cfg.train.seed, lora_cfg=cfg.lora)
    calls = _count_layer_linears(adapter.model)
    get(method).train(cfg, adapter)   # trains adapter.model in place (rm: under its scalar head)
    row = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
               if any(k.startswith("train/") for k in json.loads(x)))
    weights = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    return row, weights, calls[0], adapter


def _same_run(a, b, *, atol=1e-5):
    (row_a, w_a, calls_a, ad_a), (row_b, w_b, calls_b, ad_b) = a, b
    on = getattr(ad_b.model, "is_activation_checkpointing", None)
    assert on and not ad_a.model.is_activation_checkpointing
    assert calls_a > 0 and calls_b > calls_a, (calls_a, calls_b)   # the backward pass recomputed
    for k, v in row_a.items():
        timing = k.endswith("_s") or k.endswith("per_s")
        if k.startswith("train/") and not timing and isinstance(v, float) and math.isfinite(v):
            assert row_b[k] == pytest.approx(v, rel=1e-4, abs=atol), k
    assert w_a.keys() == w_b.keys()
    for n in w_a:
        assert torch.allclose(w_a[n], w_b[n], atol=1e-6), n


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_the_same_step_with_checkpointing(method, world, tmp_path):
    runs = []
    for ckpt in (False, True):
        out = tmp_path / f"ckpt{int(ckpt)}"
        sets = [s.format(d=world / "data", out=out) for s in DATA[method]] + [f"model.path={world / 'model'}"]
        runs.append(_one_step(method, out, sets, ckpt))
    _same_run(*runs)


@pytest.mark.parametrize("family", [f for f in families() if f != "generic"])
def test_every_family_gives_the_same_sft_step_with_checkpointing(family, world, tmp_path):
    runs = []
    for ckpt in (False, True):
        out = tmp_path / f"ckpt{int(ckpt)}"
        sets = [f"data.train_file={world / 'data' / 'vqa_train.json'}", f"model.tiny={family}"]
        runs.append(_one_step("sft", out, sets, ckpt))
    _same_run(*runs)
