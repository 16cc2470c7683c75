"""Per-token log-probabilities of given target ids."""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target], in fp32. logits (R, T, V), targets (R, T) -> (R, T)."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
