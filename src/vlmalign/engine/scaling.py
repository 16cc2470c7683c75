"""Memory options that depend on the machine: the optimizer (``optim.name``: torch's AdamW or
bitsandbytes' 8-bit AdamW), sharding (``train.sharding``) and what an ``accelerate launch`` asked
for (DeepSpeed ZeRO, FSDP, their CPU offload), each refused with a clear message where it cannot
run.

``accelerate launch`` tells its processes what to build through environment variables
(``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``,
``ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE``, ``FSDP_OFFLOAD_PARAMS``, ...); :func:`launch_plan`
reads them. An FSDP launch, like ``train.sharding=fsdp2``, is carried out by the engine itself
with torch's FSDP2 (:mod:`.sharding`), on CPU processes as on GPUs: accelerate 1.16 would turn it
into DDP over gloo on a machine without CUDA, and its own FSDP2 wrapping cannot run the image
encoding outside the model's forward. DeepSpeed stays accelerate's: on GPUs, or on CPU processes
with ``DS_ACCELERATOR=cpu`` (DeepSpeed's CPU accelerator over gloo; the engine then builds
accelerate for DeepSpeed rather than for CPU). CPU offload (DeepSpeed's or FSDP's) needs CUDA
(:func:`check_launch`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Mapping

import torch

from ..errors import VlmalignError

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")
CPU_CONFIG = "configs/accelerate/cpu2.yaml"
FSDP_CONFIG = "configs/accelerate/fsdp.yaml"


class ScalingError(VlmalignError):
    """A memory or sharding option that cannot run on this machine or with these settings."""


def _true(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class LaunchPlan:
    """What the launcher asked these processes to build."""
    sharding: str | None = None           # "deepspeed", "fsdp" or None (DDP / one process)
    zero_stage: int | None = None
    offload_optimizer: str = "none"       # DeepSpeed: none | cpu | nvme
    offload_params: str = "none"          # DeepSpeed: none | cpu | nvme; FSDP: cpu when fsdp_offload_params
    fsdp_version: int | None = None       # FSDP: the config's fsdp_version (the engine runs 2)
    activation_checkpointing: bool = False  # FSDP: fsdp_activation_checkpointing
    source: str = "launch"                # "launch" (accelerate's environment) or "train.sharding"

    @property
    def offloads(self) -> bool:
        return self.offload_optimizer != "none" or self.offload_params != "none"


def launch_plan(env: Mapping[str, str] | None = None) -> LaunchPlan:
    env = os.environ if env is None else env
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return LaunchPlan("deepspeed", int(stage) if stage and stage.isdigit() else None,
                          env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower(),
                          env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower())
    if _true(env.get("ACCELERATE_USE_FSDP")):
        off = "cpu" if _true(env.get("FSDP_OFFLOAD_PARAMS")) else "none"
        ver = env.get("FSDP_VERSION", "1")   # accelerate's default is FSDP1
        return LaunchPlan("fsdp", offload_optimizer=off, offload_params=off,   # FSDP2 offloads both
                          fsdp_version=int(ver) if ver.isdigit() else None,
                          activation_checkpointing=_true(env.get("FSDP_ACTIVATION_CHECKPOINTING")))
    return LaunchPlan()


def engine_shards(train_cfg, env: Mapping[str, str] | None = None) -> bool:
    """Whether the engine will shard this run with FSDP2 (``train.sharding=fsdp2`` or an FSDP
    launch), for a method to refuse early what sharding does not run."""
    return train_cfg.sharding == "fsdp2" or launch_plan(env).sharding == "fsdp"


def check_optimizer(name: str, *, cuda: bool | None = None) -> None:
    """Refuse ``optim.name`` where it cannot run: the 8-bit optimizers need bitsandbytes and CUDA."""
    if name not in EIGHT_BIT:
        return
    cuda = torch.cuda.is_available() if cuda is None else cuda
    missing = []
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        missing.append("the bitsandbytes package, which is not installed (pip install 'vlmalign[gpu]')")
    if not cuda:
        missing.append("a CUDA GPU (this machine has none: torch.cuda.is_available() is False)")
    if missing:
        raise ScalingError(f"optim.name={name} needs " + " and ".join(missing) +
                           "; optim.name=adamw runs anywhere")


def check_launch(optimizer: str, *, sharding: str = "none", precision: str = "auto", cuda: bool | None = None,
                 plan: LaunchPlan | None = None, ds_cpu: bool | None = None) -> LaunchPlan:
    """Refuse a launch this machine or these settings cannot run; returns the plan, whose
    ``sharding`` is ``"fsdp"`` where the engine shards with FSDP2 (``train.sharding=fsdp2`` or an
    accelerate FSDP launch). ``ds_cpu``: DeepSpeed was told to run on CPU processes
    (``DS_ACCELERATOR=cpu``, :func:`deepspeed_cpu`)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    ds_cpu = deepspeed_cpu() if ds_cpu is None else ds_cpu
    plan = launch_plan() if plan is None else plan
    if sharding == "fsdp2":
        if plan.sharding == "deepspeed":
            raise ScalingError("train.sharding=fsdp2 and a DeepSpeed launch (ACCELERATE_USE_DEEPSPEED=true) would "
                               "both shard the model: launch without the DeepSpeed config, or set "
                               "train.sharding=none")
        if plan.sharding is None:
            plan = replace(plan, sharding="fsdp", fsdp_version=2, source="train.sharding")
    if plan.sharding == "deepspeed" and not cuda and plan.offloads:
        raise ScalingError(
            "this process was launched for DeepSpeed ZeRO (ACCELERATE_USE_DEEPSPEED=true) with CPU offload, which "
            "needs CUDA GPUs; this machine has none (the offload moves GPU training's state to CPU memory, where it "
            f"is already here). On CPU processes launch configs/accelerate/zero2.yaml or zero3.yaml with "
            f"DS_ACCELERATOR=cpu, or {CPU_CONFIG} with train.sharding=fsdp2")
    if plan.sharding == "deepspeed" and not cuda and not ds_cpu:
        raise ScalingError(
            "this process was launched for DeepSpeed ZeRO (ACCELERATE_USE_DEEPSPEED=true), which needs CUDA GPUs "
            "or DeepSpeed's CPU accelerator; this machine has no GPU and DS_ACCELERATOR is not cpu, and accelerate "
            "would quietly train without sharding. Launch again with DS_ACCELERATOR=cpu in the environment (ZeRO "
            f"over gloo on the CPU processes), or use {CPU_CONFIG} (DDP) with train.sharding=fsdp2 to shard")
    if plan.sharding == "fsdp":
        what = "FSDP (ACCELERATE_USE_FSDP=true)" if plan.source == "launch" else "train.sharding=fsdp2"
        if plan.offloads and not cuda:
            raise ScalingError(
                f"this process was launched for {what} with CPU offload, which needs CUDA GPUs; this machine has "
                f"none (fsdp_offload_params keeps GPU training's parameters in CPU memory; here they are there "
                f"already). To shard on CPU processes launch with {FSDP_CONFIG}, or add train.sharding=fsdp2 to "
                f"a {CPU_CONFIG} launch")
        if plan.fsdp_version != 2:
            raise ScalingError(f"this process was launched for {what} with fsdp_version: {plan.fsdp_version}; the "
                               f"engine shards with FSDP2 only (torch's fully_shard): set fsdp_version: 2 "
                               f"({FSDP_CONFIG} does)")
        if plan.activation_checkpointing:
            raise ScalingError(f"this process was launched for {what} with fsdp_activation_checkpointing: true; "
                               "the engine does not apply FSDP's activation checkpointing: set it to false and "
                               "use model.gradient_checkpointing=true")
        if precision == "fp16":
            raise ScalingError("train.precision=fp16 with FSDP2 sharding: fp16's loss scaling has not been run "
                               "on sharded gradients here; use train.precision=bf16 (GPUs) or fp32")
    if optimizer in EIGHT_BIT and plan.offload_optimizer != "none":
        where = ("DeepSpeed's optimizer offload replaces the optimizer with its own CPU Adam"
                 if plan.sharding == "deepspeed" else
                 "FSDP's CPU offload steps the optimizer on CPU tensors, which bitsandbytes' 8-bit "
                 "optimizers are not built for")
        raise ScalingError(f"optim.name={optimizer} cannot be combined with offloading the optimizer state "
                           f"({where}); use optim.name=adamw with an offload config, or a config without offload "
                           f"with optim.name={optimizer}")
    return plan


def deepspeed_cpu(env: Mapping[str, str] | None = None) -> bool:
    """Whether DeepSpeed was told to run on CPU processes (``DS_ACCELERATOR=cpu``; its CPU
    accelerator then talks over gloo, or oneCCL where oneccl_bindings_for_pytorch is installed)."""
    env = os.environ if env is None else env
    return env.get("DS_ACCELERATOR", "").strip().lower() == "cpu"


def deepspeed_backend() -> str:
    """The process-group backend DeepSpeed's accelerator talks over (its CPU accelerator: ``ccl``
    where oneccl_bindings_for_pytorch is installed, else ``gloo``)."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError as e:
        raise ScalingError(f"this process was launched for DeepSpeed ZeRO, but deepspeed cannot be imported ({e}): "
                           "pip install 'vlmalign[deepspeed]'") from e
    return get_accelerator().communication_backend_name()


def make_optimizer(params, optim_cfg, *, lr: float | None = None, weight_decay: float | None = None):
    """The optimizer ``optim_cfg.name`` names over ``params`` (parameters or groups), with the
    section's betas and eps (``lr`` / ``weight_decay``: other than the section's, e.g. a critic's)."""
    check_optimizer(optim_cfg.name)
    kw = dict(lr=optim_cfg.lr if lr is None else lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    if weight_decay is not None:
        kw["weight_decay"] = weight_decay
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[optim_cfg.name]
    return cls(params, **kw)
