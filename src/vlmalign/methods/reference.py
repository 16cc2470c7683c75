"""The reference model every KL- or ratio-based method compares its policy with (DPO family, KTO,
GRPO, PPO): its config section, where it comes from, and the settings that keep log-ratios clean.

Where the reference comes from (:func:`build_reference`), in order:

* ``copy_ref``, a frozen copy of the starting policy taken before training (:func:`starting_copy`:
  full fine-tuning without ``ref.path``);
* the policy itself with its LoRA adapters disabled (LoRA without ``ref.path``: no second model);
* ``ref.path``, a separate model of the policy's family and vocabulary.

The reference reuses the policy's image features when both encoders are frozen and equal
(:func:`same_encoder`), so each image is encoded once per step for both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import opt, section
from ..config.sections import DataSection, FrozenEncoderModel, LoraSection, OptimSection, TrainSection
from ..errors import ModelError, VlmalignError
from ..eval.during_training import EvalTasksSection
from ..models.zero import any_partitioned, gathered
from .logps import Reference


@dataclass
class RefSection:
    path: str | None = opt(None, "reference model directory or hub id; default: the policy with LoRA adapters "
                                 "disabled under LoRA, else a frozen copy of the starting policy")


@dataclass
class PolicyConfig:
    """The sections of every method that trains a policy against a reference (DPO, KTO, GRPO,
    PPO); a method adds its own and may restate one with its own defaults or help."""
    model: FrozenEncoderModel = section(FrozenEncoderModel, "policy model to start from and which parts to train "
                                                            "(by default vision tower and projector stay frozen)")
    lora: LoraSection = section(LoraSection, "LoRA / QLoRA")
    data: DataSection = section(DataSection, "training and held-out files")
    optim: OptimSection = section(OptimSection, "optimizer and learning-rate schedule")
    train: TrainSection = section(TrainSection, "loop, batch sizes, precision, checkpoints")
    ref: RefSection = section(RefSection, "reference model")
    eval: EvalTasksSection = section(EvalTasksSection, "benchmark evals during training (eval.tasks)")


def disable_dropout(module: torch.nn.Module) -> None:
    """Dropout off everywhere in ``module`` (LoRA dropout and attention dropout included)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def same_encoder(policy, ref, model_cfg, lora_cfg) -> bool:
    """True when the policy's image features can serve the reference: vision tower and projector
    frozen in the policy (no LoRA on them) and equal, tensor by tensor, to the reference's."""
    if model_cfg.train_vision or model_cfg.train_projector or (lora_cfg.enabled and lora_cfg.include_vision):
        return False
    if policy is ref:
        return True
    pg, rg = policy.param_groups(), ref.param_groups()
    for g in ("vision", "projector"):
        a, b = dict(pg[g]), dict(rg[g])
        if a.keys() != b.keys():
            return False
        # ZeRO-3 shards are empty tensors: compare the full ones (every process takes part)
        with gathered([*a.values(), *b.values()]):
            if any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k].to(a[k].device)) for k in a):
                return False
    return True


def starting_copy(adapter, cfg):
    """A copy of the starting policy to serve as the frozen reference, or None where the reference
    is the LoRA-disabled policy or ``ref.path``. Take it before the policy's first update."""
    if cfg.ref.path or cfg.lora.enabled:
        return None
    if any_partitioned(adapter.model):
        raise ModelError("the policy's parameters are ZeRO-3 shards (built under deepspeed.zero.Init) before "
                         "the reference copy was taken: take the copy before DeepSpeed partitions the model, "
                         "or set ref.path")
    return type(adapter)(copy.deepcopy(adapter.model), adapter.processor)


def build_reference(cfg, adapter, peft_model, copy_ref=None, *, no_dropout: bool = True):
    """(Reference, separate reference adapter or None) for a config with ``model``, ``lora`` and
    ``ref`` sections: ``copy_ref`` (:func:`starting_copy`), the LoRA-disabled policy, or
    ``ref.path``. ``no_dropout``: turn the separate reference's dropout off."""
    if copy_ref is not None:
        return _frozen(copy_ref, cfg, adapter, no_dropout=no_dropout), copy_ref
    if cfg.lora.enabled and not cfg.ref.path:
        share = same_encoder(adapter, adapter, cfg.model, cfg.lora)
        return Reference(adapter, context=peft_model.disable_adapter, share_features=share, kind="lora"), None
    if not cfg.ref.path:
        raise VlmalignError("no reference: set ref.path, enable LoRA, or pass a copy of the starting policy")
    from ..models import load_adapter
    from ..models.loading import resolve_dtype
    ref_ad = load_adapter(cfg.ref.path, trust_remote_code=cfg.model.trust_remote_code,
                          dtype=resolve_dtype(cfg.model.dtype))
    if ref_ad.family != adapter.family or ref_ad.tokenizer.get_vocab() != adapter.tokenizer.get_vocab():
        raise ModelError(f"ref.path {cfg.ref.path!r}: the reference must be the policy's family with the same "
                         f"tokenizer (got {ref_ad.family} vs {adapter.family}, or a different vocabulary)")
    return _frozen(ref_ad, cfg, adapter, no_dropout=no_dropout), ref_ad


def _frozen(ref_ad, cfg, adapter, *, no_dropout: bool = True) -> Reference:
    ref_ad.model.eval()
    ref_ad.model.requires_grad_(False)
    if no_dropout:
        disable_dropout(ref_ad.model)
    return Reference(ref_ad, share_features=same_encoder(adapter, ref_ad, cfg.model, cfg.lora), kind="model")
