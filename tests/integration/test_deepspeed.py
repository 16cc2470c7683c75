"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate on two CPU processes (DeepSpeed's CPU accelerator,
``DS_ACCELERATOR=cpu``, over gloo), against the same run as DDP (configs/accelerate/cpu2.yaml):
SFT with 2 accumulated micro-batches under ZeRO-2 and ZeRO-3, DPO in full (a frozen copy as
reference) and with LoRA (the adapters disabled as reference) under ZeRO-3. Per-step losses and
gradient norms, and the saved weights (ZeRO-3: gathered from the shards), match DDP's. Skipped
where deepspeed is not installed (``pip install 'vlmalign[deepspeed]'``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")]

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def _launch(root: Path, config: str, method: str, out: Path, *sets: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "DS_ACCELERATOR": "cpu"}
    data = "vqa_train.json" if method == "sft" else "dpo_train.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "vlmalign", "train", method,
           f"model.path={root / 'model'}", f"data.train_file={root / 'data' / data}", "data.max_train_samples=8",
           "data.max_length=256", "train.batch_size=1", "train.grad_accum=2", "train.max_steps=2",
           "train.progress=false", "optim.eps=1e-4", f"train.output_dir={out}", *(s.format(out=out) for s in sets)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file
    d = {}
    for f in sorted((out / "checkpoints" / "step-2" / "model").glob("*.safetensors")):
        d.update(load_file(str(f)))
    return d


def _same(a: list[dict], b: list[dict], wa: dict, wb: dict) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-6)
        assert x["train/grad_norm"] == pytest.approx(y["train/grad_norm"], abs=1e-5)
    assert wa.keys() == wb.keys() and wa
    assert all(wb[k].shape == wa[k].shape and wb[k].numel() > 0 for k in wa)   # full tensors, not shards
    assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) < 1e-6


@pytest.mark.parametrize("method,sets", [
    ("sft", ()), ("dpo", ()),
    # the reference log-probs precomputed on the policy with its adapters off: under ZeRO-3 every
    # process computes them (each forward gathers the partitioned parameters collectively)
    ("dpo", ("lora.enabled=true", "dpo.precompute_ref_logps=true", "dpo.ref_cache_dir={out}/ref_cache"))],
    ids=["sft", "dpo", "dpo_lora_ref_cache"])
def test_zero_matches_ddp_on_two_cpu_processes(shapes_llava, tmp_path, method, sets):
    ddp = _launch(shapes_llava, "cpu2.yaml", method, tmp_path / "ddp", *sets)
    start = _weights(tmp_path / "ddp")
    stages = ("zero2.yaml", "zero3.yaml") if method == "sft" else ("zero3.yaml",)
    for config in stages:
        got = _launch(shapes_llava, config, method, tmp_path / config, *sets)
        _same(ddp, got, start, _weights(tmp_path / config))
    if method == "sft":   # the two steps moved the weights: the comparison above is not of untouched ones
        from safetensors.torch import load_file
        base = load_file(str(shapes_llava / "model" / "model.safetensors"))
        moved = [float((start[k].float() - base[k].float()).abs().max()) for k in start if k in base]
        assert moved and max(moved) > 1e-6


def test_resume_under_deepspeed_is_refused(shapes_llava, tmp_path):
    _launch(shapes_llava, "zero2.yaml", "sft", tmp_path / "run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "zero2.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "vlmalign", "train", "sft",
           f"model.path={shapes_llava / 'model'}", f"data.train_file={shapes_llava / 'data' / 'vqa_train.json'}",
           "data.max_train_samples=8", "data.max_length=256", "train.batch_size=1", "train.grad_accum=2",
           "train.max_steps=3", "train.progress=false", "optim.eps=1e-4", f"train.output_dir={tmp_path / 'run'}",
           "train.resume=true"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "train.resume=true under DeepSpeed" in r.stderr, r.stderr[-3000:]
