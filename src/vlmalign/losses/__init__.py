"""Loss functions: pure functions of tensors and settings returning ``(loss, metrics)``."""

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
