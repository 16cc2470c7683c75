"""PPO's critic: the value model, its image features, advantages, score shaping, critic metrics.

* :func:`build_value_model` -- a :class:`~vlmalign.models.ScalarModel` of kind ``value``: a copy
  of the STARTING policy's backbone with a new head (``value.init=policy``), or a reward model
  directory from ``vlmalign train rm`` with its trained head (``value.init=reward_model``; the
  usual InstructGPT choice). Its vision tower and projector stay frozen; the language model
  trains in full, or through its own LoRA adapters when the policy uses LoRA (the critic never
  shares adapters with the policy: they learn different things at different rates). Its LM
  head is frozen (values need no logits).
* :func:`critic_features` -- the image features the critic reads: the policy's sampling-time
  features when both encoders are frozen and equal (one encoding per unique image serves the
  policy, the reference and the critic), else the critic's own encoding, computed ONCE per
  rollout (no grad: its tower is frozen) and reused by every minibatch and epoch.
* :func:`ppo_advantages` -- token rewards ``r_t = -beta kl_t + [t = last] score`` (KL folded
  into the reward, Ziegler et al. 2019), GAE over them with the critic's values, whitened
  advantages. The arithmetic is in :mod:`vlmalign.losses.rl`.
* :func:`shape_scores` -- optional penalties on the sequence score: a response that never
  emitted a stop token, and a per-token length cost.
* :func:`explained_variance` -- how much of the returns' variance the values explain.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..config import opt
from ..errors import ModelError, VlmalignError
from ..losses.rl import gae, kl_in_reward, masked_mean, masked_var, masked_whiten

VALUE_INITS = ("policy", "reward_model")


@dataclass
class ValueSection:
    init: str = opt("policy", "where the critic starts: policy (a copy of the starting policy with a new value "
                              "head) or reward_model (the reward model in value.path, its head included)",
                    VALUE_INITS)
    path: str | None = opt(None, "value.init=reward_model: a directory written by `vlmalign train rm` (same family "
                                 "and tokenizer as the policy)")
    lr: float = opt(1e-5, "critic learning rate (its own optimizer, optim.name, constant; betas and eps from optim)", gt=0)
    weight_decay: float = opt(0.0, "critic AdamW weight decay", ge=0)
    max_grad_norm: float = opt(1.0, "clip the critic's gradient norm to this value, apart from the policy's "
                                    "(0: no clipping)", ge=0)
    clip_range: float | None = opt(0.2, "value clipping: new values stay within this distance of the rollout's "
                                        "(null: unclipped squared error)", gt=0)
    warmup_iterations: int = opt(0, "rollout iterations at the start that train only the critic; the policy "
                                    "is not changed during them", ge=0)

    def check(self) -> None:
        if self.init == "reward_model" and not self.path:
            raise VlmalignError("value.init=reward_model needs value.path (a `vlmalign train rm` model directory)")
        if self.init == "policy" and self.path:
            raise VlmalignError("value.path is only read with value.init=reward_model")


# ----------------------------------------------------------------------------- the critic
def _plain_copy(model):
    """A deep copy of ``model`` without LoRA layers (adapters merged: at the start of training
    they are zero, so this is the starting policy)."""
    from ..models.peft import is_peft
    m = copy.deepcopy(model)
    return m.merge_and_unload() if is_peft(m) else m


def build_value_model(vcfg: ValueSection, policy, start_model, lora_cfg, *, seed: int = 0, dtype=None):
    """The critic for ``policy`` (a family adapter): a ScalarModel(kind="value") on its own
    adapter (its own ``encode_calls`` counters), on the policy's device.

    ``start_model``: the policy's model before any update (plain or PEFT-wrapped), copied for
    ``init=policy``. ``lora_cfg``: the policy's LoRA section; when enabled the critic trains
    LoRA adapters of the same rank on its own copy of the base.
    """
    from ..models import ScalarModel, load_scalar_model
    from ..config import validate_config
    from .reference import disable_dropout
    validate_config(vcfg, "value.")
    if vcfg.init == "reward_model":
        vm = load_scalar_model(vcfg.path, dtype=dtype, device=policy.device, is_trainable=True)
        ad = vm.adapter
        if ad.family != policy.family or ad.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
            raise ModelError(f"value.path {vcfg.path!r}: the critic reads the policy's token ids, so it must be the "
                             f"policy's family with the same tokenizer (got {ad.family} vs {policy.family}, or a "
                             "different vocabulary)")
        from ..models.peft import is_peft
        if not is_peft(vm.base):  # a LoRA reward model keeps training its adapters (load_scalar_model)
            ad.set_trainable(vision=False, projector=False, language=True, head=False)
        vm.kind = "value"
    else:
        ad = type(policy)(_plain_copy(start_model), policy.processor)
        ad.model.to(policy.device)
        ad.set_trainable(vision=False, projector=False, language=not lora_cfg.enabled, head=False)
        base = ad.model
        if lora_cfg.enabled:
            from peft import LoraConfig, get_peft_model
            targets = lora_cfg.targets or ad.lora_target_modules()
            base = get_peft_model(ad.model, LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                                                       lora_dropout=lora_cfg.dropout, target_modules=targets,
                                                       bias="none"))
        vm = ScalarModel(ad, base, kind="value", seed=seed)
    for _, p in ad.param_groups()["head"]:
        p.requires_grad_(False)
    for g in ("vision", "projector"):
        for _, p in ad.param_groups()[g]:
            p.requires_grad_(False)
    vm.head.requires_grad_(True)
    disable_dropout(vm)
    return vm


def shares_policy_features(policy, value_model, model_cfg, lora_cfg) -> bool:
    """True when the policy's image features can serve the critic (both encoders frozen and equal)."""
    from .reference import same_encoder
    return same_encoder(policy, value_model.adapter, model_cfg, lora_cfg)


@torch.no_grad()
def critic_features(value_model, batch, share: bool):
    """Features of ``batch``'s unique images for the critic: the rollout's own (``share``) or one
    no-grad encoding with the critic's adapter. None for a text-only batch."""
    if share or not batch.images:
        return batch.encoded
    return batch.encode(value_model.adapter)


# ----------------------------------------------------------------------------- advantages and metrics
@torch.no_grad()
def shape_scores(scores: torch.Tensor, finished: torch.Tensor, lengths: torch.Tensor, *,
                 missing_eos_penalty: float = 0.0, length_penalty: float = 0.0) -> torch.Tensor:
    """Sequence scores after the optional penalties of PPO for language models:

        s' = s - missing_eos_penalty * [no stop token]  -  length_penalty * n_tokens

    The first discourages rambling until ``max_new_tokens`` (TRL's ``missing_eos_penalty``;
    a response cut off there was never judged complete); the second is a per-token cost
    (a length budget; Singhal et al. 2023, "A Long Way to Go", show PPO reward gains are often
    length gains). scores, lengths: (B,); finished: (B,) bool. Returns (B,) float32.
    """
    if scores.shape != finished.shape or scores.shape != lengths.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)}, finished {tuple(finished.shape)} and lengths "
                         f"{tuple(lengths.shape)} must all be (B,)")
    s = scores.float()
    if missing_eos_penalty:
        s = s - float(missing_eos_penalty) * (~finished.bool()).float()
    if length_penalty:
        s = s - float(length_penalty) * lengths.float()
    return s


@torch.no_grad()
def ppo_advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   values: torch.Tensor, mask: torch.Tensor, *, kl_coef: float, kl_kind: str = "k1",
                   gamma: float = 1.0, lam: float = 0.95, whiten: bool = True,
                   reduce=None) -> dict[str, torch.Tensor]:
    """PPO advantages for a rollout (Ouyang et al. 2022, InstructGPT; Ziegler et al. 2019):

        r_t = -kl_coef * kl_t + [t == last valid] * score          (kl_in_reward)
        A, R = GAE(r, V; gamma, lam)                               (gae; R = A + V, the critic's targets)
        A <- (A - mean A) / std A  over the rollout's valid tokens (whiten)

    scores (B,); logprobs (the rollout policy's), ref_logprobs, values, mask (B, T) right-padded.
    Returns detached tensors: ``advantages``, ``returns``, ``rewards`` (B, T), 0 on padding.
    Whitening needs two valid tokens at least; with fewer it is skipped. ``reduce`` (a sum over
    processes): whiten over every process's tokens (:func:`~vlmalign.losses.rl.masked_whiten`).
    """
    rewards = kl_in_reward(scores, logprobs, ref_logprobs, mask, kl_coef, kl_kind)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    n = mask.bool().sum().float().reshape(1)
    n = float((reduce(n) if reduce is not None else n)[0])
    if whiten and n >= 2:
        adv = masked_whiten(adv, mask, reduce=reduce)
    return {"advantages": adv, "returns": ret, "rewards": rewards}


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the valid tokens: 1 = the critic predicts the returns, 0 = no
    better than their mean, < 0 = worse. NaN where the returns do not vary (or < 2 tokens)."""
    m = mask.bool()
    if int(m.sum()) < 2:
        return float("nan")
    var_r = float(masked_var(returns.float(), m))
    if var_r == 0.0 or not math.isfinite(var_r):
        return float("nan")
    return 1.0 - float(masked_var((returns - values).float(), m)) / var_r


@torch.no_grad()
def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) per-response KL estimate sum_t (logp - ref_logp) over valid tokens (k1, summed: the
    KL of the whole response, the number PPO papers plot)."""
    m = mask.bool()
    return torch.where(m, logprobs - ref_logprobs, torch.zeros((), dtype=logprobs.dtype,
                                                               device=logprobs.device)).sum(1)


def rows_of(t: torch.Tensor, rows, width: int) -> torch.Tensor:
    """Rows of a (R, T) rollout tensor, cut to the ``width`` columns a ``batch.select(rows)`` keeps."""
    idx = torch.as_tensor(list(rows) if not torch.is_tensor(rows) else rows, dtype=torch.long, device=t.device)
    return t[idx, :width]


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(masked_mean(x.float(), mask.bool())) if bool(mask.any()) else float("nan")
