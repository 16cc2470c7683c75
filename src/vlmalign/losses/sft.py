"""Supervised next-token loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood; 0 where ``targets == IGNORE_INDEX``.

    logits: (..., V); targets: (...) long. Computed in fp32 for stability.
    """
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view(targets.shape)


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, num_items: int | torch.Tensor | None = None):
    """Cross-entropy over supervised tokens, averaged over ``num_items``:

        L = (1 / N) * sum_{i : y_i != ignore} -log softmax(z_i)[y_i]

    logits: (B, P, V) where ``logits[b, p]`` predicts ``targets[b, p]`` (the caller has already
    shifted inputs against labels); targets: (B, P), IGNORE_INDEX where not supervised.
    ``num_items`` is N: by default the supervised tokens here; pass the count over all
    micro-batches of an optimizer step (and all processes) so accumulated and distributed
    gradients equal the single-batch gradient. Returns (loss, {"nll_sum", "tokens"}).
    """
    nll = token_nll(logits, targets)
    n_tok = (targets != IGNORE_INDEX).sum()
    denom = n_tok if num_items is None else num_items
    denom = torch.as_tensor(denom, dtype=nll.dtype, device=nll.device).clamp_min(1)
    total = nll.sum()
    return total / denom, {"nll_sum": total.detach(), "tokens": n_tok.detach()}


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor):
    """(B, T, V) logits over inputs + (B, T) labels aligned with inputs -> aligned pairs."""
    return logits[:, :-1], labels[:, 1:]
