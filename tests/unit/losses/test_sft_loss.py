import math

import torch

from vlmalign.losses.sft import IGNORE_INDEX, sft_loss


def test_sft_loss_hand_computed():
    # two positions supervised, one ignored; vocabulary of 3
    logits = torch.tensor([[[0.0, 0.0, 0.0],      # target 1: -log(1/3) = 1.098612
                            [2.0, 0.0, 0.0],      # ignored
                            [1.0, 0.0, -1.0]]])   # target 0: -log(e/(e+1+e^-1))
    targets = torch.tensor([[1, IGNORE_INDEX, 0]])
    a = math.log(3.0)
    b = -math.log(math.e / (math.e + 1.0 + math.exp(-1.0)))   # = 0.407606
    loss, m = sft_loss(logits, targets)
    assert abs(loss.item() - (a + b) / 2) < 1e-6
    assert m["tokens"].item() == 2
    assert abs(m["nll_sum"].item() - (a + b)) < 1e-6
    # a global normaliser (e.g. 5 tokens over all micro-batches) divides the same sum
    loss5, _ = sft_loss(logits, targets, num_items=5)
    assert abs(loss5.item() - (a + b) / 5) < 1e-6


def test_sft_loss_gradient_of_split_batches_equals_whole():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (4, 5))
    targets[0, :3] = IGNORE_INDEX
    targets[3, 1] = IGNORE_INDEX
    whole, _ = sft_loss(logits, targets)
    g_whole, = torch.autograd.grad(whole, logits)
    n = int((targets != IGNORE_INDEX).sum())
    parts = sft_loss(logits[:2], targets[:2], n)[0] + sft_loss(logits[2:], targets[2:], n)[0]
    g_parts, = torch.autograd.grad(parts, logits)
    assert torch.allclose(whole, parts) and torch.allclose(g_whole, g_parts)
