"""Memory options that depend on the machine: the optimizer (``optim.name``: torch's AdamW or
bitsandbytes' 8-bit AdamW) and what an ``accelerate launch`` asked for (DeepSpeed ZeRO, FSDP,
their CPU offload), each refused with a clear message where it cannot run.

``accelerate launch`` tells its processes what to build through environment variables
(``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_FSDP``, ``ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE``,
``FSDP_OFFLOAD_PARAMS``); :func:`launch_plan` reads them. On a machine without CUDA the engine
builds its Accelerator with ``cpu=True``, and accelerate then quietly ignores a DeepSpeed or FSDP
request (FSDP becomes plain DDP over gloo), so such a launch is refused instead
(:func:`check_launch`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import VlmalignError

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")
CPU_CONFIG = "configs/accelerate/cpu2.yaml"


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
        return LaunchPlan("fsdp", offload_optimizer=off, offload_params=off)   # FSDP2 offloads both
    return LaunchPlan()


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


def check_launch(optimizer: str, *, cuda: bool | None = None, plan: LaunchPlan | None = None) -> LaunchPlan:
    """Refuse a launch this machine or these settings cannot run; returns the plan."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    plan = launch_plan() if plan is None else plan
    what = {"deepspeed": "DeepSpeed ZeRO (ACCELERATE_USE_DEEPSPEED=true)",
            "fsdp": "FSDP (ACCELERATE_USE_FSDP=true)"}.get(plan.sharding)
    if what and not cuda:
        off = " with CPU offload" if plan.offloads else ""
        raise ScalingError(
            f"this process was launched for {what}{off}, which needs CUDA GPUs; this machine has none, and "
            f"accelerate would quietly train without sharding on the CPU. For CPU processes launch with "
            f"{CPU_CONFIG} (DDP over gloo); offload of optimizer state to the CPU is a GPU-machine option")
    if optimizer in EIGHT_BIT and plan.offload_optimizer != "none":
        where = ("DeepSpeed's optimizer offload replaces the optimizer with its own CPU Adam"
                 if plan.sharding == "deepspeed" else
                 "FSDP's CPU offload steps the optimizer on CPU tensors, which bitsandbytes' 8-bit "
                 "optimizers are not built for")
        raise ScalingError(f"optim.name={optimizer} cannot be combined with offloading the optimizer state "
                           f"({where}); use optim.name=adamw with an offload config, or a config without offload "
                           f"with optim.name={optimizer}")
    return plan


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
