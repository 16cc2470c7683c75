"""PPO with a critic (vlmalign train ppo): the critic's helpers by hand, then training runs on tiny
random-init LLaVA / Qwen2-VL models with ShapesWorld RL prompts."""

from __future__ import annotations

import math

import pytest
import torch

from vlmalign.methods.ppo_value import explained_variance, ppo_advantages, rows_of, sequence_kl, shape_scores


# ----------------------------------------------------------------------------- helpers by hand
def test_shape_scores_by_hand():
    scores = torch.tensor([1.0, 2.0, 0.5])
    finished = torch.tensor([True, False, True])
    lengths = torch.tensor([3, 5, 0])
    # s - 1.0 * [not finished] - 0.1 * n: 1 - 0 - 0.3 = 0.7; 2 - 1 - 0.5 = 0.5; 0.5 - 0 - 0 = 0.5
    out = shape_scores(scores, finished, lengths, missing_eos_penalty=1.0, length_penalty=0.1)
    assert torch.allclose(out, torch.tensor([0.7, 0.5, 0.5]))
    # no penalties: unchanged
    assert torch.equal(shape_scores(scores, finished, lengths), scores)
    with pytest.raises(ValueError, match="must all be"):
        shape_scores(scores, finished[:2], lengths)


def test_ppo_advantages_by_hand():
    # one row, two valid tokens and one padded (NaN there must not leak)
    logp = torch.tensor([[-1.0, -2.0, float("nan")]])
    ref = torch.tensor([[-1.5, -2.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, float("nan")]])
    mask = torch.tensor([[True, True, False]])
    score = torch.tensor([1.0])
    out = ppo_advantages(score, logp, ref, values, mask, kl_coef=0.1, gamma=1.0, lam=0.5, whiten=False)
    # k1 KL: logp - ref = [0.5, 0]; rewards = -0.1 * KL + score at the last token = [-0.05, 1.0]
    assert torch.allclose(out["rewards"], torch.tensor([[-0.05, 1.0, 0.0]]))
    # t=1: delta = 1.0 + 0 (no bootstrap) - 0.4 = 0.6 -> A1 = 0.6
    # t=0: delta = -0.05 + 0.4 - 0.2 = 0.15 -> A0 = 0.15 + 1 * 0.5 * 0.6 = 0.45
    assert torch.allclose(out["advantages"], torch.tensor([[0.45, 0.6, 0.0]]))
    # returns = A + V = [0.65, 1.0]
    assert torch.allclose(out["returns"], torch.tensor([[0.65, 1.0, 0.0]]))
    # whitened: mean 0.525, unbiased var ((-0.075)^2 + 0.075^2) / 1 = 0.01125, std 0.1061 -> -+0.7071
    w = ppo_advantages(score, logp, ref, values, mask, kl_coef=0.1, gamma=1.0, lam=0.5, whiten=True)
    assert torch.allclose(w["advantages"], torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]]), atol=1e-5)
    assert torch.allclose(w["returns"], out["returns"])  # the critic's targets are never whitened


def test_explained_variance_and_sequence_kl_by_hand():
    returns = torch.tensor([[1.0, 2.0], [3.0, 9.0]])
    values = torch.tensor([[1.0, 2.0], [2.0, float("nan")]])
    mask = torch.tensor([[True, True], [True, False]])
    # valid R = 1, 2, 3 (var 1); R - V = 0, 0, 1 (mean 1/3, squares 1/9 + 1/9 + 4/9 = 2/3, / 2 = 1/3)
    assert explained_variance(values, returns, mask) == pytest.approx(1 - 1 / 3)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert math.isnan(explained_variance(values, torch.ones(2, 2), mask))     # returns do not vary
    logp = torch.tensor([[-1.0, -2.0], [-0.5, float("-inf")]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, 0.0]])
    # row 0: 0.5 + (-1.0) = -0.5; row 1: 0 (the padded -inf is not read)
    assert sequence_kl(logp, ref, mask).tolist() == [-0.5, 0.0]
    x = torch.arange(12.0).view(3, 4)
    assert rows_of(x, [2, 0], 2).tolist() == [[8.0, 9.0], [0.0, 1.0]]
