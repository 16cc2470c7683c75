"""``optim.name``: torch's AdamW anywhere; bitsandbytes' 8-bit AdamW only where bitsandbytes and
CUDA are present, refused with a message naming what is missing (bitsandbytes is faked here: the
test machines have neither it nor a GPU). The launch checks of the shipped accelerate configs are
tests/unit/test_accelerate_configs.py's."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from vlmalign.config import ConfigError, load_config, validate_config
from vlmalign.config.sections import OptimSection
from vlmalign.engine.scaling import LaunchPlan, ScalingError, check_launch, check_optimizer, launch_plan, \
    make_optimizer
from vlmalign.methods.sft import SFTConfig, train_sft


class _Fake8bit:
    def __init__(self, params, **kw):
        self.params, self.kw = list(params), kw


@pytest.fixture
def fake_bnb(monkeypatch):
    optim = types.SimpleNamespace(AdamW8bit=type("AdamW8bit", (_Fake8bit,), {}),
                                  PagedAdamW8bit=type("PagedAdamW8bit", (_Fake8bit,), {}))
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(optim=optim))


@pytest.fixture
def no_bnb(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # import raises ImportError


def test_the_option_is_declared_with_its_choices():
    assert OptimSection().name == "adamw"
    assert load_config(SFTConfig, None, ["optim.name=paged_adamw_8bit"]).optim.name == "paged_adamw_8bit"
    with pytest.raises(ConfigError, match="adamw_8bit"):
        validate_config(load_config(SFTConfig, None, ["optim.name=adam8"]))


def test_adamw_is_torchs_with_the_sections_settings():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer([{"params": [p], "weight_decay": 0.1}], OptimSection(lr=0.5, betas=[0.8, 0.9], eps=1e-6))
    assert type(opt) is torch.optim.AdamW
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (0.5, (0.8, 0.9), 1e-6, 0.1)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_eight_bit_without_bitsandbytes_or_cuda_names_both(name, no_bnb):
    with pytest.raises(ScalingError) as ei:
        check_optimizer(name, cuda=False)
    msg = str(ei.value)
    assert msg.startswith(f"optim.name={name} needs the bitsandbytes package")
    assert "a CUDA GPU (this machine has none" in msg and "optim.name=adamw runs anywhere" in msg
    with pytest.raises(ScalingError, match="bitsandbytes") as ei:
        check_optimizer(name, cuda=True)
    assert "CUDA" not in str(ei.value).split(";")[0]


def test_eight_bit_with_bitsandbytes_but_no_cuda_names_the_cpu(fake_bnb):
    with pytest.raises(ScalingError, match=r"needs a CUDA GPU \(this machine has none") as ei:
        check_optimizer("adamw_8bit", cuda=False)
    assert "bitsandbytes" not in str(ei.value)


@pytest.mark.parametrize("name,cls", [("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit")])
def test_eight_bit_builds_the_bitsandbytes_class(name, cls, fake_bnb, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer([p], OptimSection(name=name, lr=0.25), lr=0.1, weight_decay=0.0)
    assert type(opt).__name__ == cls
    assert opt.kw == {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def test_a_run_is_refused_before_any_data_is_read(no_bnb, tmp_path):
    cfg = load_config(SFTConfig, None, ["model.tiny=llava", f"data.train_file={tmp_path / 'missing.json'}",
                                        "optim.name=adamw_8bit", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ScalingError, match="optim.name=adamw_8bit needs the bitsandbytes package"):
        train_sft(cfg)
    assert not (tmp_path / "run").exists()


def test_the_plan_is_read_from_accelerates_variables():
    assert launch_plan({}) == LaunchPlan()
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
           "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "CPU"}
    assert launch_plan(env) == LaunchPlan("deepspeed", 2, "cpu", "none")
    # accelerate's own default is FSDP1 when the launch names no version
    assert launch_plan({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "false"}) == \
        LaunchPlan("fsdp", fsdp_version=1)
    assert launch_plan({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                        "FSDP_ACTIVATION_CHECKPOINTING": "true"}) == \
        LaunchPlan("fsdp", fsdp_version=2, activation_checkpointing=True)
    # an unsharded launch on a CPU machine passes, whatever the optimizer (check_optimizer refuses that)
    assert check_launch("adamw_8bit", cuda=False, plan=LaunchPlan()) == LaunchPlan()


def test_train_sharding_is_declared_and_asks_the_engine_to_shard():
    from vlmalign.config.sections import TrainSection
    assert TrainSection().sharding == "none"
    assert load_config(SFTConfig, None, ["train.sharding=fsdp2"]).train.sharding == "fsdp2"
    with pytest.raises(ConfigError, match="fsdp2"):
        validate_config(load_config(SFTConfig, None, ["train.sharding=fsdp"]))
    plan = check_launch("adamw", sharding="fsdp2", cuda=False, plan=LaunchPlan())
    assert (plan.sharding, plan.fsdp_version, plan.source) == ("fsdp", 2, "train.sharding")
    assert check_launch("adamw", sharding="none", cuda=False, plan=LaunchPlan()) == LaunchPlan()


def test_what_the_engines_fsdp2_does_not_run_is_refused():
    fsdp2 = LaunchPlan("fsdp", fsdp_version=2)
    assert check_launch("adamw", cuda=False, plan=fsdp2) == fsdp2          # FSDP on CPU processes runs
    with pytest.raises(ScalingError, match="fsdp_version: 1; the engine shards with FSDP2 only"):
        check_launch("adamw", cuda=True, plan=LaunchPlan("fsdp", fsdp_version=1))
    with pytest.raises(ScalingError, match="fsdp_activation_checkpointing: true; .*model.gradient_checkpointing"):
        check_launch("adamw", cuda=True, plan=LaunchPlan("fsdp", fsdp_version=2, activation_checkpointing=True))
    with pytest.raises(ScalingError, match="train.precision=fp16 with FSDP2"):
        check_launch("adamw", sharding="fsdp2", precision="fp16", cuda=True, plan=LaunchPlan())
    with pytest.raises(ScalingError, match="train.sharding=fsdp2 and a DeepSpeed launch"):
        check_launch("adamw", sharding="fsdp2", cuda=True, plan=LaunchPlan("deepspeed", 3))
    offload = LaunchPlan("fsdp", None, "cpu", "cpu", fsdp_version=2)
    assert check_launch("adamw", cuda=True, plan=offload) == offload      # CPU offload: a GPU-machine option
    with pytest.raises(ScalingError, match="with CPU offload, which needs CUDA GPUs; this machine has none") as ei:
        check_launch("adamw", cuda=False, plan=offload)
    assert "configs/accelerate/fsdp.yaml" in str(ei.value)


def test_deepspeed_on_cpu_is_asked_for_by_ds_accelerator_and_needs_deepspeed(monkeypatch):
    from vlmalign.engine.scaling import deepspeed_backend, deepspeed_cpu
    assert deepspeed_cpu({"DS_ACCELERATOR": "cpu"}) and deepspeed_cpu({"DS_ACCELERATOR": " CPU "})
    assert not deepspeed_cpu({}) and not deepspeed_cpu({"DS_ACCELERATOR": "cuda"})
    z3 = LaunchPlan("deepspeed", 3)
    assert check_launch("adamw", cuda=False, plan=z3, ds_cpu=True) == z3
    with pytest.raises(ScalingError, match="DS_ACCELERATOR is not cpu"):
        check_launch("adamw", cuda=False, plan=z3, ds_cpu=False)
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(sys.modules, "deepspeed.accelerator", None)
    with pytest.raises(ScalingError, match=r"deepspeed cannot be imported .*vlmalign\[deepspeed\]"):
        deepspeed_backend()


def test_fsdp2_refuses_modules_trained_beside_the_model_unless_the_method_shards_them():
    """PPO's critic (an extra module) runs sharded because its method has ``shard_modules``
    (tests/integration/test_rl_processes.py, ``ppo_fsdp2``); a method without it is refused."""
    from vlmalign.engine.trainer import Engine

    def engine(method):
        e = Engine.__new__(Engine)
        e.launch = LaunchPlan("fsdp", fsdp_version=2, source="train.sharding")
        e.method, e.extra_modules, e._task_evals = method, {"value_model": torch.nn.Linear(2, 1)}, []
        return e

    with pytest.raises(ScalingError, match=r"train.sharding=fsdp2: the modules trained beside the model "
                                           r"\(value_model\) are not sharded"):
        engine(types.SimpleNamespace())._check_shardable()
    engine(types.SimpleNamespace(shard_modules=lambda shard: None))._check_shardable()
