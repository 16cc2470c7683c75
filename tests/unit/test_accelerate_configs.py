"""The shipped accelerate configs (configs/accelerate/*.yaml) are valid for accelerate itself:
its own loader parses them, ``accelerate launch``'s validation accepts them and picks the
expected launcher, and every nested DeepSpeed/FSDP key is an option accelerate knows (the loader
only checks top-level keys; a misspelt nested key would be silently ignored). The environment
accelerate's launcher gives its processes tells the engine what it asked for (engine/scaling.py:
sharding, offload), the multi-machine file yields the torchrun arguments it should, and on a
machine without CUDA the configs that can run there launch two processes that train (fsdp.yaml's
launch on CPU processes: tests/integration/test_fsdp2.py), while DeepSpeed and CPU offload are
refused with a clear message."""

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
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from vlmalign.engine.scaling import LaunchPlan, ScalingError, check_launch, launch_plan

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"

# file -> (distributed_type, launcher flag _validate_launch_command sets, extra expectations)
EXPECTED = {
    "ddp.yaml": (DistributedType.MULTI_GPU, "multi_gpu", {}),
    "cpu2.yaml": (DistributedType.MULTI_GPU, "multi_gpu", {"num_processes": 2, "mixed_precision": "no"}),
    "zero2.yaml": (DistributedType.DEEPSPEED, "use_deepspeed", {"zero_stage": 2}),
    "zero3.yaml": (DistributedType.DEEPSPEED, "use_deepspeed", {"zero_stage": 3, "zero3_save_16bit_model": True}),
    "fsdp.yaml": (DistributedType.FSDP, "use_fsdp", {"fsdp_version": 2}),
    "multinode.yaml": (DistributedType.MULTI_GPU, "multi_gpu", {"num_machines": 2, "num_processes": 16}),
    "zero3_offload.yaml": (DistributedType.DEEPSPEED, "use_deepspeed",
                           {"zero_stage": 3, "offload_optimizer_device": "cpu", "offload_param_device": "none"}),
    "fsdp_offload.yaml": (DistributedType.FSDP, "use_fsdp", {"fsdp_version": 2, "fsdp_offload_params": True}),
}
# file -> what the engine reads from the environment accelerate's launcher sets
PLANS = {
    "ddp.yaml": LaunchPlan(), "cpu2.yaml": LaunchPlan(), "multinode.yaml": LaunchPlan(),
    "zero2.yaml": LaunchPlan("deepspeed", 2), "zero3.yaml": LaunchPlan("deepspeed", 3),
    "zero3_offload.yaml": LaunchPlan("deepspeed", 3, offload_optimizer="cpu"),
    "fsdp.yaml": LaunchPlan("fsdp", fsdp_version=2),
    "fsdp_offload.yaml": LaunchPlan("fsdp", None, "cpu", "cpu", fsdp_version=2),
}


def test_every_expected_config_is_shipped_and_nothing_else():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def _launch_args(path: Path, *flags: str):
    args = launch_command_parser().parse_args(["--config_file", str(path), *flags, "-m", "vlmalign", "train", "sft"])
    _validate_launch_command(args)
    return args


def _launch_env(name: str, *flags: str) -> tuple:
    """(args, environment) accelerate's launcher would give the processes of ``name``."""
    args = _launch_args(CONFIGS / name, "--main_process_port", "29561", *flags)
    if args.use_deepspeed:   # as accelerate's deepspeed_launcher sets it before building the env
        args.deepspeed_fields_from_accelerate_config = "zero_stage"
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


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


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_launch_environment_tells_the_engine_what_was_asked(name):
    assert launch_plan(_launch_env(name)[1]) == PLANS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_without_cuda_the_configs_without_deepspeed_or_offload_start(name):
    """DDP and FSDP (which the engine carries out with FSDP2, engine/sharding.py) start on CPU
    processes; DeepSpeed does with DS_ACCELERATOR=cpu (its CPU accelerator) and is refused
    without it; CPU offload needs CUDA and is refused."""
    plan = launch_plan(_launch_env(name)[1])
    assert check_launch("adamw", cuda=True, plan=plan) == plan
    if plan.sharding is None or (plan.sharding == "fsdp" and not plan.offloads):
        assert check_launch("adamw", cuda=False, plan=plan) == plan
        return
    if plan.offloads:
        for ds_cpu in (False, True):
            with pytest.raises(ScalingError, match="with CPU offload, which needs CUDA GPUs; this machine has "
                                                   "none") as ei:
                check_launch("adamw", cuda=False, plan=plan, ds_cpu=ds_cpu)
            assert "cpu2.yaml" in str(ei.value)
        return
    assert plan.sharding == "deepspeed"
    with pytest.raises(ScalingError, match="needs CUDA GPUs or DeepSpeed's CPU accelerator; this machine has no "
                                           "GPU and DS_ACCELERATOR is not cpu") as ei:
        check_launch("adamw", cuda=False, plan=plan, ds_cpu=False)
    assert "DS_ACCELERATOR=cpu" in str(ei.value) and "cpu2.yaml" in str(ei.value)
    assert check_launch("adamw", cuda=False, plan=plan, ds_cpu=True) == plan


@pytest.mark.parametrize("name", ["zero3_offload.yaml", "fsdp_offload.yaml"])
def test_eight_bit_optimizers_are_refused_with_offload(name):
    plan = launch_plan(_launch_env(name)[1])
    for opt in ("adamw_8bit", "paged_adamw_8bit"):
        with pytest.raises(ScalingError, match=f"optim.name={opt} cannot be combined with offloading"):
            check_launch(opt, cuda=True, plan=plan)
    assert check_launch("adamw_8bit", cuda=True, plan=launch_plan(_launch_env(name.replace("_offload", ""))[1]))


def test_multinode_gives_torchrun_the_node_rank_and_rendezvous():
    cfg = load_config_from_file(str(CONFIGS / "multinode.yaml"))
    assert (cfg.num_machines, cfg.num_processes, cfg.machine_rank, cfg.main_process_port) == (2, 16, 0, 29500)
    assert cfg.main_process_ip is None   # given per launch (--main_process_ip), as the comments show
    args, _ = _launch_env("multinode.yaml", "--machine_rank", "1", "--main_process_ip", "node001")
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert args.rdzv_endpoint == "node001:29561" and args.rdzv_backend == "static"


def test_a_misspelt_nested_key_would_be_caught(tmp_path):
    """The check above can fail: accelerate itself accepts the typo silently."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "zero2.yaml").read_text().replace("zero_stage:", "zero_stag:"))
    cfg = load_config_from_file(str(bad))  # accelerate does not complain
    dests = {a.dest for a in launch_command_parser()._actions}
    assert "zero_stag" in cfg.deepspeed_config and "zero_stag" not in dests


def _launch_tiny_sft(tmp_path, name: str, *flags: str, port: int):
    """``accelerate launch --config_file NAME FLAGS -m vlmalign train sft`` of one step on a tiny
    LLaVA, CUDA hidden: (completed process, run directory)."""
    from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
    from vlmalign.models import save_tiny
    generate_shapesworld(tmp_path / "data", ShapesConfig(seed=1, train_images=4, eval_images=2))
    save_tiny("llava", str(tmp_path / "model"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / name), *flags,
           "--main_process_port", str(port), "-m", "vlmalign", "train", "sft", f"model.path={tmp_path / 'model'}",
           f"data.train_file={tmp_path / 'data' / 'vqa_train.json'}", "data.max_train_samples=8",
           "data.max_length=256", "train.batch_size=2", "train.max_steps=1", "train.progress=false",
           f"train.output_dir={out}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600), out


@pytest.mark.slow
@pytest.mark.parametrize("name,flags", [("cpu2.yaml", ()), ("ddp.yaml", ("--num_processes", "2"))])
def test_a_cpu_launch_starts_two_processes_that_train(tmp_path, name, flags):
    """cpu2.yaml (and ddp.yaml cut to two processes) run two gloo processes: with 8 records and
    batch_size 2, one step covers 4 records (2 per process), i.e. half an epoch; a single
    process would log epoch 0.25."""
    r, out = _launch_tiny_sft(tmp_path, name, *flags, port=29547 + len(flags))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if "train/loss" in x]
    assert len(train) == 1 and train[0]["epoch"] == pytest.approx(0.5)


@pytest.mark.slow
def test_an_fsdp_launch_without_cuda_is_refused_before_training(tmp_path):
    """FSDP's CPU offload needs CUDA: the engine refuses it on CPU processes before training."""
    r, out = _launch_tiny_sft(tmp_path, "fsdp_offload.yaml", "--num_processes", "2", port=29551)
    assert r.returncode != 0
    assert "launched for FSDP (ACCELERATE_USE_FSDP=true) with CPU offload, which needs CUDA GPUs" in r.stderr
    assert not (out / "metrics.jsonl").exists()
