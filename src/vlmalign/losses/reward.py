"""Reward-model losses over scalar scores: pairwise (Bradley-Terry) and listwise (Plackett-Luce).

Every function returns ``(losses, stats)``: ``losses`` is per example, shape (B,), NOT reduced
(callers sum and divide by a count taken over all micro-batches and processes); ``stats`` maps
names to detached per-example (B,) float tensors. Computation stays in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_vector(name: str, x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dim() != 1:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a (B,) tensor of scalar scores, got {shape}")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: float | torch.Tensor | None = None):
    """Pairwise reward-model loss (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022):

        L = -log sigmoid(r_c - r_r - m)

    with an optional margin ``m`` (a float or a (B,) tensor), as in Llama 2's reward model
    (Touvron et al. 2023), which asks for a larger gap on pairs rated far apart.

    chosen, rejected: (B,) scalar rewards. Returns ``(losses (B,), stats)`` with stats
    ``accuracy`` (1.0 where r_c > r_r), ``margin`` (r_c - r_r, without m), ``chosen_reward``,
    ``rejected_reward``.
    """
    _check_vector("chosen", chosen)
    _check_vector("rejected", rejected)
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} "
                         "must have the same shape")
    diff = chosen - rejected                                        # (B,)
    logits = diff
    if margin is not None:
        if torch.is_tensor(margin):
            if margin.dim() != 0 and margin.shape != chosen.shape:
                raise ValueError(f"margin must be a float or a {tuple(chosen.shape)} tensor, "
                                 f"got shape {tuple(margin.shape)}")
            margin = margin.to(dtype=diff.dtype, device=diff.device)
        logits = diff - margin
    losses = -F.logsigmoid(logits)
    d = diff.detach()
    stats = {
        "accuracy": (d > 0).to(d.dtype),
        "margin": d,
        "chosen_reward": chosen.detach(),
        "rejected_reward": rejected.detach(),
    }
    return losses, stats


def _check_ranked(name: str, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate (B, K) scores and a valid-prefix mask; return the mask (all True if None)."""
    if not torch.is_tensor(scores) or scores.dim() != 2:
        shape = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise ValueError(f"{name} must be a (B, K) tensor ordered best first, got {shape}")
    if mask is None:
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    else:
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.shape != scores.shape:
            got = (tuple(mask.shape), mask.dtype) if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of shape {tuple(scores.shape)}, got {got}")
    if scores.shape[1] < 2:
        raise ValueError(f"a ranking needs at least 2 candidates, {name} has K={scores.shape[1]}")
    # a valid prefix: once False, stays False along K
    not_prefix = (mask[:, 1:] & ~mask[:, :-1]).any(dim=1)
    too_short = mask.sum(dim=1) < 2
    bad = (not_prefix | too_short).nonzero().flatten().tolist()
    if bad:
        b = bad[0]
        why = ("is not a prefix (a valid candidate follows a padded one)" if not_prefix[b]
               else f"has {int(mask[b].sum())} valid candidate(s); a ranking needs at least 2")
        raise ValueError(f"mask row {b} {why}; rows with problems: {bad}")
    return mask


def plackett_luce_loss(scores: torch.Tensor, mask: torch.Tensor | None = None):
    """Listwise ranking loss (Plackett 1975; Luce 1959), as used for K-wise reward models
    (Zhu et al. 2023, "Principled RLHF from pairwise or K-wise comparisons"):

        L = -sum_{i valid} [ s_i - logsumexp_{j >= i, j valid} s_j ]

    i.e. the negative log-probability of the given order when candidates are drawn best first
    without replacement with probabilities softmax(s). The last valid term is 0. With K = 2 this
    is exactly ``-log sigmoid(s_0 - s_1)`` (Bradley-Terry).

    scores: (B, K) ordered best first. mask: (B, K) bool, True for valid candidates; each row
    must be a valid prefix with at least 2 candidates (lists of unequal length are padded at the
    end; padded scores may hold any value, even non-finite: they are never used).

    Returns ``(losses (B,), stats)``; stats over ordered pairs (i < j, both valid):
    ``accuracy`` = fraction with s_i > s_j, ``margin`` = mean of s_i - s_j, ``top1`` = 1.0 where
    s_0 beats every other valid score, ``chosen_reward`` = s_0, ``num_candidates``.
    """
    mask = _check_ranked("scores", scores, mask)
    k = scores.shape[1]
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    s = torch.where(mask, scores, zero)                               # (B, K), padding -> 0
    idx = torch.arange(k, device=scores.device)
    later = idx[None, :] >= idx[:, None]                              # (K, K): j >= i
    # allowed[b, i, j]: j is among the candidates still left when position i is drawn.
    allowed = later[None] & mask[:, None, :] & mask[:, :, None]        # (B, K, K)
    # padded positions i keep only j == i, so their term is s_i - s_i = 0 with zero gradient
    allowed = allowed | (torch.eye(k, dtype=torch.bool, device=scores.device)[None] & ~mask[:, :, None])
    expanded = s[:, None, :].expand(-1, k, -1)                        # (B, K, K): [b, i, j] = s_j
    lse = torch.logsumexp(expanded.masked_fill(~allowed, float("-inf")), dim=-1)  # (B, K)
    losses = -(s - lse).sum(dim=1)

    d = s.detach()
    pair = (idx[None, :] > idx[:, None])[None] & mask[:, :, None] & mask[:, None, :]  # (B, K, K) i<j
    diffs = d[:, :, None] - d[:, None, :]                             # [b, i, j] = s_i - s_j
    n_pairs = pair.sum(dim=(1, 2)).to(d.dtype)
    wins = ((diffs > 0) & pair).sum(dim=(1, 2)).to(d.dtype)
    margin = torch.where(pair, diffs, torch.zeros_like(diffs)).sum(dim=(1, 2)) / n_pairs
    top1 = ((diffs[:, 0, :] > 0) | ~pair[:, 0, :]).all(dim=1).to(d.dtype)
    stats = {
        "accuracy": wins / n_pairs,
        "margin": margin,
        "top1": top1,
        "chosen_reward": d[:, 0],
        "num_candidates": mask.sum(dim=1).to(d.dtype),
    }
    return losses, stats
