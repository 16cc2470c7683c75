"""Online RL on two CPU processes (DDP over gloo, ``torch.distributed.run``) against one process
with the same global step, on the tiny random-init LLaVA: GRPO (and REINFORCE++, whose
advantages are normalised over the whole step's tokens) and PPO (whose critic's gradients are
averaged over the processes and whose advantages are whitened over every process's tokens);
GRPO and PPO also sharded with FSDP2 (``train.sharding=fsdp2``: PPO's critic sharded beside the
policy), where the sharded PPO run is also resumed from its step-1 checkpoint and must end where
it ended; and GRPO and PPO sharded with a LoRA policy (PPO's critic LoRA too), whose FSDP2 root
unit is the model inside the PEFT wrapper, so that sampling (``generate``) gathers it.

Each prompt's k samples are drawn on one process from generators seeded by the prompt's place
in the step (``OnlineTrainer.row_seeds``), so the two layouts sample the same tokens; the only
differences left are float summation orders (other padding widths and batch shapes, sums over
two processes). Adam's eps is 1e-4, as in test_fsdp2.py: with 1e-8 an entry whose gradient is
~0 moves by about lr in the direction its rounding picks.

Launches: 2 per case (one process, two processes), 2 optimizer steps each; ``ppo_fsdp2`` a
third (the resume, 1 step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from ports import free_port

DIGIT = "reward=[{type: function, name: format, args: {pattern: '[0-9]', mode: search}}]"
# per process: 2 prompts x k=4; one process: 4 prompts x k=4 (the same 4 prompts each step)
RUNS = {
    "grpo": ("grpo", ["EVAL"]),
    "reinforce_pp": ("grpo", ["grpo.estimator=reinforce_pp", "kl.placement=reward", "kl.coef=0.05"]),
    # PPO: 2 epochs over the rollout, one minibatch each (minibatch_size 0: all rows of a process),
    # the first step a critic warm-up (policy unchanged, DDP gets zero policy gradients)
    "ppo": ("ppo", ["update.epochs=2", "value.lr=1e-3", "value.warmup_iterations=1"]),
    # FSDP2: the policy sharded over the two processes (synced generation, the held-out
    # evaluation on both); the one-process run stays whole
    "grpo_fsdp2": ("grpo", ["train.sharding=fsdp2", "EVAL"]),
    # PPO sharded: the policy and the critic (a root of its own on the same mesh), both
    # reduce-scattered by FSDP2; the checkpoints hold both gathered whole, the critic's optimizer
    # state included (written at each step here: the resume below starts from step-1; and the
    # step-1 save, in the warm-up, gathers the policy's optimizer before its first update, which
    # torch's gathering used to fill with a zero-gradient step that changed step 2's update)
    "ppo_fsdp2": ("ppo", ["update.epochs=2", "value.lr=1e-3", "value.warmup_iterations=1", "train.sharding=fsdp2",
                          "train.save_every=1"]),
    # a LoRA policy sharded: the root unit is the model inside the PEFT wrapper, whose forward
    # generate calls (engine/sharding.py); the reference is the policy with its adapters off
    "grpo_lora_fsdp2": ("grpo", ["lora.enabled=true", "lora.r=4", "train.sharding=fsdp2", "EVAL"]),
    "ppo_lora_fsdp2": ("ppo", ["lora.enabled=true", "lora.r=4", "update.epochs=2", "value.lr=1e-3",
                               "train.sharding=fsdp2"]),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl2")
    generate_shapesworld(root / "data", ShapesConfig(seed=1, train_images=8, eval_images=2))
    return root


def _launch2(world, method, extra, out, port, env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "vlmalign", *_common(world, method, extra),
                           "rollout.prompts_per_step=2", f"train.output_dir={out}"],
                          env=env, capture_output=True, text=True)


def _common(world, method, extra):
    return ["train", method, "model.tiny=llava", f"data.train_file={world / 'data' / 'rl_train.json'}",
            "data.max_length=256", "train.max_steps=2", "train.progress=false", "train.save_every=0",
            "rollout.k=4", "rollout.max_new_tokens=6", "train.batch_size=4", "optim.lr=1e-3", "optim.eps=1e-4",
            DIGIT, *(f"data.eval_file={world / 'data' / 'rl_eval.json'}" if e == "EVAL" else e for e in extra)]


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]


def _weights(out: Path, step: int) -> dict:
    """The checkpoint's model loaded with plain transformers, as a state dict (a sharded run's
    file names its tensors as the engine's full state dict does: compare what loads; a LoRA
    checkpoint's adapter loaded through PEFT over the base it names)."""
    from transformers import LlavaForConditionalGeneration
    d = out / "checkpoints" / f"step-{step}" / "model"
    if (d / "adapter_config.json").exists():
        from peft import PeftModel
        base = json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), str(d))
        assert any("lora_" in k for k in model.state_dict())
    else:
        model = LlavaForConditionalGeneration.from_pretrained(str(d))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_match_one(world, tmp_path, name):
    method, extra = RUNS[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "vlmalign", *_common(world, method, extra),
                        "rollout.prompts_per_step=4", f"train.output_dir={one}"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _launch2(world, method, extra, two, free_port(), env)
    assert r.returncode == 0, r.stderr[-3000:]
    if "train.sharding=fsdp2" in extra:
        assert "FSDP2: " in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]   # the engine sharded the policy
    ra, rb = _rows(one), _rows(two)
    assert len(ra) == len(rb) == 2
    loss_diff = max(abs(a["train/loss"] - b["train/loss"]) for a, b in zip(ra, rb))
    for a, b in zip(ra, rb):
        # the same samples: the same rewards and lengths, exactly
        for key in ("train/reward", "train/response_length", "train/finished"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), (key, a, b)
        for key in ("train/loss", "train/policy_loss", "train/value_loss", "train/kl", "train/advantage_abs"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    if "EVAL" in extra:   # greedy held-out answers: the same at step 0 and at the end
        ea = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines() if "eval/reward" in x]
        eb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines() if "eval/reward" in x]
        assert len(ea) == len(eb) == 2
        for a, b in zip(ea, eb):
            assert a["eval/reward"] == b["eval/reward"] and abs(a["eval/kl"] - b["eval/kl"]) <= 1e-5, (a, b)
    wa, wb = _weights(one, 2), _weights(two, 2)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"{name}: rewards {[a['train/reward'] for a in ra]}, max |loss diff| {loss_diff:.2e}, "
          f"max |weight diff| {worst:.2e}")
    assert worst <= 1e-5, worst
    if "lora.enabled=true" in extra:
        # the adapters trained (their B factors start at zero), far beyond the difference; the
        # adapter names the base model's own class, not FSDP2's subclass of it
        moved = max(wb[k].abs().max().item() for k in wb if "lora_B" in k)
        print(f"{name}: max |lora_B| {moved:.2e}")
        assert moved >= 1e-4 and moved >= 1e3 * worst, (moved, worst)
        maps = [json.loads((d / "checkpoints" / "step-2" / "model" / "adapter_config.json").read_text())
                ["auto_mapping"] for d in (one, two)]
        assert maps[0] == maps[1] and maps[0]["base_model_class"] == "LlavaForConditionalGeneration", maps
    if method == "ppo":   # the critic trained in step too
        ca = load_file(str(one / "checkpoints" / "step-2" / "value_model.safetensors"))
        cb = load_file(str(two / "checkpoints" / "step-2" / "value_model.safetensors"))
        assert ca.keys() == cb.keys() and ca
        cworst = max((ca[k] - cb[k]).abs().max().item() for k in ca)
        print(f"{name}: max |critic weight diff| {cworst:.2e}")
        assert cworst <= 1e-5, cworst
    if name == "ppo_fsdp2":
        _check_sharded_ppo_resumes(world, extra, one, two, tmp_path / "resumed", env)


def _check_sharded_ppo_resumes(world, extra, one, two, resumed, env):
    """The sharded run's step-1 checkpoint holds the critic whole (the one-process run's names and
    shapes) and its optimizer state gathered by parameter name; resumed from it (two processes,
    sharded again), the run ends with the uninterrupted run's policy, critic and critic optimizer."""
    ck1 = two / "checkpoints" / "step-1"
    full = load_file(str(one / "checkpoints" / "step-2" / "value_model.safetensors"))
    c1 = load_file(str(ck1 / "value_model.safetensors"))
    assert {k: v.shape for k, v in c1.items()} == {k: v.shape for k, v in full.items()}
    st = torch.load(ck1 / "trainer_state.pt", weights_only=True)
    assert st["layout"]["sharding"] == "fsdp2" and st["layout"]["processes"] == 2
    copt = st["method"]["critic_optimizer"]["state"]
    assert len(copt) == len(full)   # every trainable critic parameter, by name, whole
    for k, v in copt.items():
        assert v["exp_avg"].shape == full[k.replace(".", "__")].shape, k
    # the run as a SIGKILL after step-1 leaves it: step-2 and its metrics not written yet
    import shutil
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("step-2"))
    r = _launch2(world, "ppo", [*extra, "train.resume=true"], resumed, free_port(), env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {resumed / 'checkpoints' / 'step-1'}" in r.stdout + r.stderr
    assert [x["step"] for x in _rows(resumed)] == [1, 2]
    a, b = _rows(two)[1], _rows(resumed)[1]
    wa, wb = _weights(two, 2), _weights(resumed, 2)
    ca, cb = (load_file(str(d / "checkpoints" / "step-2" / "value_model.safetensors")) for d in (two, resumed))
    oa, ob = (torch.load(d / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=True)["method"]
              ["critic_optimizer"]["state"] for d in (two, resumed))
    assert wa.keys() == wb.keys() and ca.keys() == cb.keys() and oa.keys() == ob.keys()
    diffs = {"loss": abs(a["train/loss"] - b["train/loss"]),
             "policy": max((wa[k] - wb[k]).abs().max().item() for k in wa),
             "critic": max((ca[k] - cb[k]).abs().max().item() for k in ca),
             "critic exp_avg_sq": max((oa[k]["exp_avg_sq"] - ob[k]["exp_avg_sq"]).abs().max().item() for k in oa)}
    print("ppo_fsdp2 resumed from step-1 vs uninterrupted:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-6, diffs
