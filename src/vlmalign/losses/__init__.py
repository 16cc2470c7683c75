"""Loss functions: pure functions of tensors and settings returning ``(loss, metrics)``."""

from vlmalign.losses.logps import token_logps  # noqa: F401
from vlmalign.losses.preference import (  # noqa: F401
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    changed_token_weights,
    dpo_loss,
    kto_loss,
    listwise_dpo_loss,
    mdpo_loss,
    orpo_loss,
    preference_loss,
    simpo_loss,
    token_weighted_logps,
)
from vlmalign.losses.reward import bradley_terry_loss, plackett_luce_loss  # noqa: F401
from vlmalign.losses.rl import (  # noqa: F401
    RunningMoments,
    discounted_returns,
    entropy_bonus,
    entropy_from_logits,
    expand_to_tokens,
    gae,
    group_advantages,
    kl_in_reward,
    kl_penalty,
    masked_mean,
    masked_whiten,
    normalise_rewards,
    policy_loss_clipped,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss_clipped,
)
