"""Critic-free online RL on vision-language models: GRPO, Dr. GRPO, RLOO and REINFORCE++.

k responses are sampled per prompt (images encoded once per prompt group) and scored by the
recipe's reward sources; each response's advantage comes from the rewards of its group
(``losses/rl.py``: ``group_advantages``, ``rloo_advantages``, ``reinforce_pp_advantages``) and
is put on every one of its tokens; the clipped policy-gradient loss, optionally with a KL penalty
to the reference (in the loss, k3, as in GRPO; or subtracted from the reward), is aggregated per
the estimator. The loop (rollout, rewards, reference, updates, checkpoints, evaluation) is
:mod:`vlmalign.engine.online` (its shared pieces :mod:`.online`); docs/RL.md ("GRPO / RLOO") lists the settings and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import opt, section, validate_config, with_defaults
from ..errors import VlmalignError
from ..losses.rl import AGGREGATIONS, expand_to_tokens, group_advantages, kl_in_reward, masked_mean, \
    reinforce_pp_advantages, rloo_advantages
from .online import KLSection, OnlineConfig, policy_objective, run_online
from .registry import Method

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
# the aggregation each estimator's paper uses (grpo.loss_agg=auto)
DEFAULT_AGG = {"grpo": "seq_mean_token_mean", "dr_grpo": "token_sum_norm", "rloo": "token_mean",
               "reinforce_pp": "token_mean"}


@dataclass
class GRPOSection:
    estimator: str = opt("grpo", "advantage estimator: grpo ((r - group mean) / group std), dr_grpo (r - group "
                                 "mean), rloo (r - mean of the other k-1), reinforce_pp (REINFORCE++: rewards "
                                 "whitened over the whole batch)", ESTIMATORS)
    loss_agg: str = opt("auto", "how per-token losses are averaged: token_mean, seq_mean_token_mean (each "
                                "response weighs the same), token_sum_norm (Dr. GRPO: / max_new_tokens); auto: "
                                "the estimator's own (grpo: seq_mean_token_mean, dr_grpo: token_sum_norm, "
                                "rloo and reinforce_pp: token_mean)", ("auto",) + AGGREGATIONS)
    std_eps: float = opt(1e-6, "grpo: added to the group std before dividing", ge=0)


GRPOKL = with_defaults(KLSection, "GRPOKL", coef=0.04)


@dataclass
class GRPOConfig(OnlineConfig):
    """Defaults: the language model learns, vision tower and projector stay frozen (one image
    encoding serves sampling, the reference and every update); KL 0.04 in the loss with k3
    (DeepSeekMath's GRPO); a small constant learning rate."""
    kl: GRPOKL = section(GRPOKL, "KL to the reference: coef, estimator, in the loss (GRPO) or the reward")
    grpo: GRPOSection = section(GRPOSection, "advantage estimator and loss aggregation")

    def check(self) -> None:
        super().check()
        if self.grpo.estimator != "reinforce_pp" and self.rollout.k < 2:
            raise VlmalignError(f"grpo.estimator={self.grpo.estimator} compares the k responses of a prompt: "
                                f"rollout.k must be >= 2, got {self.rollout.k}")


class GRPOMethod:
    """The advantage and loss hooks of the online loop for the critic-free estimators."""

    def __init__(self, cfg: GRPOConfig):
        validate_config(cfg)
        g = cfg.grpo
        self.cfg = cfg
        self.estimator = g.estimator
        self.agg = DEFAULT_AGG[g.estimator] if g.loss_agg == "auto" else g.loss_agg

    def advantages(self, loop, batch, data) -> dict:
        """``data["advantages"]`` (R, T): the sequence advantage on each response token."""
        kl, k, mask = self.cfg.kl, self.cfg.rollout.k, batch.response_mask
        scores = data["scores"]
        token_rewards = None
        if kl.coef > 0 and kl.placement == "reward":
            old = data.get("old_logprobs", batch.logprobs)
            token_rewards = kl_in_reward(scores, old, data["ref_logprobs"], mask, kl.coef, kl.estimator)
        if self.estimator == "reinforce_pp":
            # normalised over the whole step's tokens: every process's (loop.process_sum)
            adv = reinforce_pp_advantages(token_rewards if token_rewards is not None else scores, mask,
                                          reduce=getattr(loop, "process_sum", None))
        else:
            # with the KL in the reward, a response's reward is score - coef * (its summed KL)
            seq = token_rewards.sum(1) if token_rewards is not None else scores
            if self.estimator == "rloo":
                seq_adv = rloo_advantages(seq, k)
            else:
                seq_adv = group_advantages(seq, k, scale_std=self.estimator == "grpo", eps=self.cfg.grpo.std_eps)
            adv = expand_to_tokens(seq_adv, mask)
        data["advantages"] = adv
        return {"advantage_abs": float(masked_mean(adv.abs(), mask))}

    def loss(self, loop, mb, data, logprobs, hidden, num_items):
        return policy_objective(logprobs, data, mb.response_mask, update=self.cfg.update, kl=self.cfg.kl,
                                agg=self.agg, num_items=num_items, norm_len=self.cfg.rollout.max_new_tokens)


def train_grpo(cfg: GRPOConfig, adapter=None, reward=None, callbacks=()):
    """Train with the configured estimator. Returns ``(TrainResult, adapter)``."""
    return run_online(cfg, GRPOMethod(cfg), adapter=adapter, reward=reward, callbacks=callbacks)


METHODS = (
    Method("grpo", "online RL without a critic: GRPO, Dr. GRPO, RLOO, REINFORCE++ (k samples per "
           "prompt, reward functions / reward models / VLM judges)",
           GRPOConfig, train_grpo),
)
