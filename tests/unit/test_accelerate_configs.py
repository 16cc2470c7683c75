"""The shipped accelerate configs (configs/accelerate/*.yaml) are valid for accelerate itself:
its own loader parses them, ``accelerate launch``'s validation accepts them and picks the
expected launcher, and every nested DeepSpeed/FSDP key is an option accelerate knows (the loader
only checks top-level keys; a misspelt nested key would be silently ignored)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"

# file -> (distributed_type, launcher flag _validate_launch_command sets, extra expectations)
EXPECTED = {
    "ddp.yaml": (DistributedType.MULTI_GPU, "multi_gpu", {}),
    "cpu2.yaml": (DistributedType.MULTI_GPU, "multi_gpu", {"num_processes": 2, "mixed_precision": "no"}),
    "zero2.yaml": (DistributedType.DEEPSPEED, "use_deepspeed", {"zero_stage": 2}),
    "zero3.yaml": (DistributedType.DEEPSPEED, "use_deepspeed", {"zero_stage": 3, "zero3_save_16bit_model": True}),
    "fsdp.yaml": (DistributedType.FSDP, "use_fsdp", {"fsdp_version": 2}),
}


def test_every_expected_config_is_shipped_and_nothing_else():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def _launch_args(path: Path):
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "vlmalign", "train", "sft"])
    _validate_launch_command(args)
    return args


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerates_loader(name):
    kind, flag, extra = EXPECTED[name]
    cfg = load_config_from_file(str(CONFIGS / name))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type == kind
    args = _launch_args(CONFIGS / name)
    launchers = ("multi_gpu", "use_deepspeed", "use_fsdp", "cpu", "tpu")
    assert [f for f in launchers if getattr(args, f)] == [flag]
    for key, value in extra.items():
        assert getattr(args, key) == value, key
    assert args.num_processes == cfg.num_processes >= 2


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nested_keys_are_options_accelerate_knows(name):
    cfg = load_config_from_file(str(CONFIGS / name))
    dests = {a.dest for a in launch_command_parser()._actions}
    for section, prefix in (("deepspeed_config", ""), ("fsdp_config", "fsdp_")):
        for key in getattr(cfg, section):
            k = key if key.startswith(prefix) else prefix + key
            assert k in dests, f"{name}: {section}.{key} is not an accelerate launch option"


def test_a_misspelt_nested_key_would_be_caught(tmp_path):
    """The check above can fail: accelerate itself accepts the typo silently."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "zero2.yaml").read_text().replace("zero_stage:", "zero_stag:"))
    cfg = load_config_from_file(str(bad))  # accelerate does not complain
    dests = {a.dest for a in launch_command_parser()._actions}
    assert "zero_stag" in cfg.deepspeed_config and "zero_stag" not in dests


@pytest.mark.slow
def test_cpu2_starts_two_processes_that_train(tmp_path):
    """``accelerate launch --config_file configs/accelerate/cpu2.yaml -m vlmalign train sft`` runs
    two gloo processes: with 8 records and batch_size 2, one step covers 4 records (2 per
    process), i.e. half an epoch; a single process would log epoch 0.25."""
    from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
    from vlmalign.models import save_tiny
    generate_shapesworld(tmp_path / "data", ShapesConfig(seed=1, train_images=4, eval_images=2))
    save_tiny("llava", str(tmp_path / "model"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu2.yaml"),
           "--main_process_port", "29547", "-m", "vlmalign", "train", "sft", f"model.path={tmp_path / 'model'}",
           f"data.train_file={tmp_path / 'data' / 'vqa_train.json'}", "data.max_train_samples=8",
           "data.max_length=256", "train.batch_size=2", "train.max_steps=1", "train.progress=false",
           f"train.output_dir={out}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if "train/loss" in x]
    assert len(train) == 1 and train[0]["epoch"] == pytest.approx(0.5)
