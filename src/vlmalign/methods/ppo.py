"""PPO with a critic on vision-language models (``vlmalign train ppo``).

The policy samples responses to RL prompts (images encoded once per step, shared by every sample
of a prompt, the reference and the critic when their encoders are frozen and equal); the
recipe's reward sources score them; the frozen reference (the policy with its LoRA adapters
disabled, a frozen copy of the starting policy, or ``ref.path``) gives per-token KL; the critic
(:mod:`.ppo_value`: a value head on a copy of the starting policy or on a reward model) gives
per-token values. Advantages are GAE over token rewards ``-beta * KL_t`` plus the score at the
last token (InstructGPT, Ouyang et al. 2022; Ziegler et al. 2019), whitened; then
``update.epochs`` passes of minibatch updates of the clipped policy loss (Schulman et al. 2017)
and the clipped value loss. Policy and critic share no parameters and have an optimizer each
(learning rate, weight decay and gradient clipping of their own), so one backward of the sum of
both losses gives each its own gradient. During the first ``value.warmup_iterations`` steps
only the critic learns. Under FSDP2 (``train.sharding=fsdp2``) the critic is sharded like the
policy, on the same mesh (:meth:`PPOMethod.shard_modules`), and its optimizer works on its shards.

The loop (rollout, rewards, reference, minibatch epochs, checkpoints, evaluation) is
:mod:`.online`; this module supplies its hooks. docs/RL.md ("PPO") lists settings and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import opt, section, validate_config, with_defaults
from ..config.sections import LoraSection, RLOptim
from ..engine.scaling import check_optimizer, make_optimizer
from ..errors import VlmalignError
from ..losses.rl import AGGREGATIONS, masked_mean, value_loss_clipped
from ..rollout import sequence_values
from .online import KLSection, OnlineConfig, UpdateSection, policy_objective, run_online
from .ppo_value import (ValueSection, build_value_model, critic_features, explained_variance,
                        ppo_advantages, sequence_kl, shape_scores, shares_policy_features)
from .registry import Method


@dataclass
class PPOSection:
    gamma: float = opt(1.0, "GAE discount per token", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda (1: Monte-Carlo returns minus values; 0: one-step TD)", ge=0, le=1)
    whiten_advantages: bool = opt(True, "normalise the advantages to mean 0, std 1 over each rollout's tokens")
    loss_agg: str = opt("token_mean", "how per-token policy and value losses are averaged", AGGREGATIONS)
    missing_eos_penalty: float = opt(0.0, "subtracted from the score of a response that hit "
                                          "rollout.max_new_tokens without a stop token", ge=0)
    length_penalty: float = opt(0.0, "subtracted from the score per response token", ge=0)


PPOKL = with_defaults(KLSection, "PPOKL", coef=0.05, estimator="k1", placement="reward")
PPOUpdate = with_defaults(UpdateSection, "PPOUpdate", epochs=4)


@dataclass
class PPOConfig(OnlineConfig):
    """Defaults: the language model learns, vision tower and projector stay frozen (one image
    encoding per step serves sampling, reference, critic and every update); KL 0.05 with the
    k1 estimator folded into the reward; 4 PPO epochs per rollout; gamma 1, lambda 0.95, ratio
    and value clip 0.2 (the PPO-for-LMs settings of Ziegler et al. 2019 / InstructGPT); a small
    constant policy learning rate and a 10x larger critic one."""
    lora: LoraSection = section(LoraSection, "LoRA / QLoRA (the critic gets LoRA adapters of its own)")
    optim: RLOptim = section(RLOptim, "optimizer and learning-rate schedule of the policy (per optimizer step)")
    kl: PPOKL = section(PPOKL, "KL to the reference: coef, estimator, in the reward (PPO) or the loss")
    update: PPOUpdate = section(PPOUpdate, "updates per rollout: epochs, minibatch size, ratio clip")
    ppo: PPOSection = section(PPOSection, "GAE, advantage whitening, loss aggregation, score penalties")
    value: ValueSection = section(ValueSection, "the critic: initialisation, learning rate, value clip, warm-up")

    def check(self) -> None:
        super().check()
        if self.value.warmup_iterations >= max(self.train.max_steps, 1) and self.train.max_steps > 0:
            raise VlmalignError(f"value.warmup_iterations ({self.value.warmup_iterations}) leaves no step of "
                                f"train.max_steps ({self.train.max_steps}) for the policy")


class _Trainable(torch.nn.Module):
    """The critic's trainable parameters (the same tensors) under flat names: what the loop puts
    in its optimizer and checkpoints. Frozen parts are rebuilt from their source on resume."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.take(model)

    def take(self, model: torch.nn.Module) -> None:
        """(Re)register ``model``'s trainable parameters (after sharding: its new DTensor ones)."""
        for n, p in model.named_parameters():
            if p.requires_grad:
                self.register_parameter(n.replace(".", "__"), p)


class PPOMethod:
    """The online loop's hooks for PPO: values at rollout time, GAE advantages, policy + value loss.

    ``value_model``: the critic (:func:`~.ppo_value.build_value_model` from ``adapter``, the
    policy adapter BEFORE training, unless given)."""

    def __init__(self, cfg: PPOConfig, adapter, value_model=None):
        from ..models.loading import resolve_dtype
        validate_config(cfg)
        self.cfg = cfg
        self.agg = cfg.ppo.loss_agg
        self.value_model = value_model if value_model is not None else build_value_model(
            cfg.value, adapter, adapter.model, cfg.lora, seed=cfg.train.seed, dtype=resolve_dtype(cfg.model.dtype))
        self.share = shares_policy_features(adapter, self.value_model, cfg.model, cfg.lora)
        self._view = _Trainable(self.value_model)
        # the critic's own optimizer: its learning rate and gradient clipping apart from the policy's
        self.critic_optimizer = self._make_optimizer()
        self._critic_batch = None
        self.critic_grad_norm = None
        self.sharded = False

    def _make_optimizer(self):
        return make_optimizer(list(self._view.parameters()), self.cfg.optim, lr=self.cfg.value.lr,
                              weight_decay=self.cfg.value.weight_decay)

    # ------------------------------------------------------------------ loop hooks
    def extra_modules(self) -> dict:
        return {"value_model": self._view}

    def shard_modules(self, shard) -> None:
        """(FSDP2, called by the engine after it sharded the policy) the critic sharded with
        ``shard(root, units)``: its family adapter's units, the critic itself the root; then its
        view and optimizer rebuilt on the sharded parameters (built before any step: no state to
        carry over). Its gradients are then reduced by FSDP2, its checkpointed weights and
        optimizer state gathered whole (:meth:`state_dict`)."""
        shard(self.value_model, self.value_model.adapter.shard_units(),
              replicated=self.value_model.adapter.replicated_parameters())
        self._view.take(self.value_model)
        self.critic_optimizer = self._make_optimizer()
        self.sharded = True

    def update_policy(self, loop) -> bool:
        """False during the critic warm-up: the loop then skips the policy's optimizer step."""
        return loop.step >= self.cfg.value.warmup_iterations

    def optimizer_step(self, loop) -> None:
        """After each minibatch (the loop has stepped, or skipped, the policy): step the critic."""
        params = list(self._view.parameters())
        # several processes: the critic's gradients averaged over them, as DDP does for the policy
        loop.average_gradients(params)
        mg = self.cfg.value.max_grad_norm
        if mg and mg > 0:
            if self.sharded:   # DTensor shards beside the parameters sharding kept whole
                from ..engine.sharding import clip_grad_norm_
                gn = clip_grad_norm_(params, mg)
            else:
                gn = torch.nn.utils.clip_grad_norm_(params, mg)
            if not torch.isfinite(gn):
                raise VlmalignError(f"non-finite critic gradient norm at step {loop.step + 1}; the run is stopped")
            self.critic_grad_norm = float(gn)
        self.critic_optimizer.step()
        self.critic_optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """The critic optimizer's state; sharded, its full state by parameter name (gathered:
        every process must call it)."""
        if self.sharded:
            from ..engine import sharding
            return {"critic_optimizer": sharding.full_optimizer_state(self.value_model, self.critic_optimizer)}
        return {"critic_optimizer": self.critic_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "critic_optimizer" not in state:
            raise VlmalignError("the checkpoint holds no critic optimizer state (not a PPO run?)")
        if self.sharded:   # every process passes the full state; each keeps its shards
            from ..engine import sharding
            sharding.load_optimizer_state(self.value_model, self.critic_optimizer, state["critic_optimizer"])
        else:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])

    def rollout_extras(self, loop, batch) -> dict:
        """(no grad, run by the loop before the updates) the critic's values of the rollout.
        The critic's image features are the rollout's own, or its own encoding, once."""
        if getattr(loop.acc, "scaler", None) is not None:
            raise VlmalignError("PPO does not support train.precision=fp16 (the critic's optimizer would see "
                                "loss-scaled gradients); use bf16 or fp32")
        vm = self.value_model
        if not self.sharded:   # sharded: FSDP2 keeps it on the device
            vm.to(loop.acc.device)
        vm.eval()
        self._critic_batch = replace(batch, encoded=critic_features(vm, batch, self.share))
        values = loop.chunked(lambda mb: sequence_values(vm, mb, encoded=mb.encoded), self._critic_batch)
        vm.train()
        return {"values": values, "row_index": torch.arange(batch.num_rows, device=values.device)}

    def advantages(self, loop, batch, data) -> dict:
        p, kl, mask = self.cfg.ppo, self.cfg.kl, batch.response_mask
        scores = shape_scores(data["scores"], batch.finished, batch.response_lengths,
                              missing_eos_penalty=p.missing_eos_penalty, length_penalty=p.length_penalty)
        old = data.get("old_logprobs", batch.logprobs)     # the rollout policy's log-probs
        ref = data.get("ref_logprobs", old)                # no reference: no KL
        coef = kl.coef if kl.placement == "reward" else 0.0
        out = ppo_advantages(scores, old, ref, data["values"], mask, kl_coef=coef, kl_kind=kl.estimator,
                             gamma=p.gamma, lam=p.lam, whiten=p.whiten_advantages,
                             reduce=getattr(loop, "process_sum", None))   # whitened over every process's tokens
        data["advantages"], data["returns"] = out["advantages"], out["returns"]
        stats = {"score": float(scores.mean()), "kl_rollout": float(sequence_kl(old, ref, mask).mean()),
                 "value_mean": float(masked_mean(data["values"], mask)),
                 "return_mean": float(masked_mean(out["returns"], mask)),
                 "explained_variance": explained_variance(data["values"], out["returns"], mask),
                 "critic_warmup": float(loop.step < self.cfg.value.warmup_iterations)}
        return stats

    def loss(self, loop, mb, data, logprobs, hidden, num_items):
        c, mask = self.cfg, mb.response_mask
        cmb = self._critic_batch.select(data["row_index"].tolist())   # the same rows, the critic's features
        values = sequence_values(self.value_model, cmb, encoded=cmb.encoded, with_grad=True)
        vloss, vst = value_loss_clipped(values, data["values"], data["returns"], mask, clip_range=c.value.clip_range,
                                        agg=self.agg, num_items=num_items, norm_len=c.rollout.max_new_tokens)
        stats = {"value_loss": vloss.detach(), "vf_clipfrac": vst["vf_clipfrac"], "value_error": vst["value_error"]}
        loss = vloss   # the critic's parameters get only this gradient, the policy's only the policy loss
        if self.update_policy(loop):     # warm-up: no policy loss (and the loop skips its optimizer step)
            ploss, pst = policy_objective(logprobs, data, mask, update=c.update, kl=c.kl, agg=self.agg,
                                          num_items=num_items, norm_len=c.rollout.max_new_tokens)
            loss = loss + ploss
            stats.update(pst)
        elif loop.world > 1:
            # DDP waits for a gradient of every policy parameter its forward used: zero ones
            loss = loss + 0.0 * logprobs.sum()
        return loss, stats


def train_ppo(cfg: PPOConfig, adapter=None, reward=None, method: PPOMethod | None = None, callbacks=()):
    """Train with PPO. ``adapter``: the starting policy (default: built from ``cfg.model``);
    ``method``: a ready :class:`PPOMethod` for that adapter (default: built here, critic
    included). Returns ``(TrainResult, adapter)``; the critic is ``method.value_model``."""
    from .setup import build_adapter, seed_everything
    validate_config(cfg)
    check_optimizer(cfg.optim.name)   # before the model is loaded
    seed_everything(cfg.train.seed)
    adapter = adapter or build_adapter(cfg.model, seed=cfg.train.seed, lora_cfg=cfg.lora)
    method = method or PPOMethod(cfg, adapter)
    return run_online(cfg, method, adapter=adapter, reward=reward, callbacks=callbacks)


METHODS = (
    Method("ppo", "PPO with a critic: value model from the policy or a reward model, KL to a frozen "
           "reference, GAE, minibatch epochs, critic warm-up",
           PPOConfig, train_ppo),
)
