import math

import pytest
import torch

from vlmalign.losses.reward import bradley_terry_loss, plackett_luce_loss


def test_bradley_terry_hand_computed():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([-1.0, 2.0])
    losses, st = bradley_terry_loss(chosen, rejected)
    # row 0: r_c - r_r = 1 - (-1) = 2  -> log(1 + e^-2) = 0.126928
    # row 1: r_c - r_r = 0 - 2 = -2    -> log(1 + e^2)  = 2.126928
    assert losses.shape == (2,)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    assert losses[1].item() == pytest.approx(math.log(1 + math.exp(2)), abs=1e-6)
    assert st["accuracy"].tolist() == [1.0, 0.0]
    assert st["margin"].tolist() == [2.0, -2.0]
    assert st["chosen_reward"].tolist() == [1.0, 0.0]
    assert st["rejected_reward"].tolist() == [-1.0, 2.0]


def test_bradley_terry_margin_float_and_tensor():
    chosen = torch.tensor([1.0, 1.0])
    rejected = torch.tensor([0.0, 0.0])
    # float margin 0.5: logits = 1 - 0 - 0.5 = 0.5 -> log(1 + e^-0.5) = 0.474077
    losses, st = bradley_terry_loss(chosen, rejected, margin=0.5)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.5))] * 2, abs=1e-6)
    # the margin stat is r_c - r_r, without m
    assert st["margin"].tolist() == [1.0, 1.0]
    # per-row margins [0, 3]: logits 1 and -2 -> log(1 + e^-1) = 0.313262, log(1 + e^2) = 2.126928
    losses, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.0, 3.0]))
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(1 + math.exp(2))],
                                            abs=1e-6)


def test_bradley_terry_gradient_signs_and_no_input_mutation():
    chosen = torch.tensor([0.3, -0.2], requires_grad=True)
    rejected = torch.tensor([0.1, 0.4], requires_grad=True)
    before = (chosen.detach().clone(), rejected.detach().clone())
    losses, _ = bradley_terry_loss(chosen, rejected)
    losses.sum().backward()
    # descending the loss raises the chosen score and lowers the rejected one
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # d/dr_c of -log sig(d) = -(1 - sig(d)); row 0: d = 0.2
    assert chosen.grad[0].item() == pytest.approx(-(1 - 1 / (1 + math.exp(-0.2))), abs=1e-6)
    assert torch.equal(chosen.detach(), before[0]) and torch.equal(rejected.detach(), before[1])


def test_bradley_terry_keeps_dtype():
    losses, st = bradley_terry_loss(torch.tensor([1.0], dtype=torch.bfloat16),
                                    torch.tensor([0.0], dtype=torch.bfloat16))
    assert losses.dtype == torch.bfloat16 and st["accuracy"].dtype == torch.bfloat16


def test_bradley_terry_bad_shapes():
    with pytest.raises(ValueError, match="chosen"):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3))


def test_plackett_luce_hand_computed_three():
    scores = torch.tensor([[2.0, 1.0, 0.0]])
    losses, st = plackett_luce_loss(scores)
    # i=0: 2 - log(e^2 + e^1 + e^0) ; i=1: 1 - log(e^1 + e^0) ; i=2: 0 - log(e^0) = 0
    t0 = 2 - math.log(math.exp(2) + math.exp(1) + 1)
    t1 = 1 - math.log(math.exp(1) + 1)
    assert losses.item() == pytest.approx(-(t0 + t1), abs=1e-6)   # = 0.824033...
    # pairs (0,1): 1, (0,2): 2, (1,2): 1 -> all correct, mean margin 4/3
    assert st["accuracy"].item() == 1.0
    assert st["margin"].item() == pytest.approx(4 / 3, abs=1e-6)
    assert st["top1"].item() == 1.0
    assert st["num_candidates"].item() == 3.0


def test_plackett_luce_mask_unequal_lengths_and_stats():
    # row 0: 3 candidates [0, 1, 3]; row 1: 2 valid [1, 0], padded with garbage (nan / inf)
    scores = torch.tensor([[0.0, 1.0, 3.0],
                           [1.0, 0.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    losses, st = plackett_luce_loss(scores, mask)
    # row 0: i=0: 0 - log(1 + e + e^3); i=1: 1 - log(e + e^3)
    r0 = -((0 - math.log(1 + math.e + math.exp(3))) + (1 - math.log(math.e + math.exp(3))))
    # row 1 equals Bradley-Terry on (1, 0): log(1 + e^-1)
    r1 = math.log(1 + math.exp(-1))
    assert losses.tolist() == pytest.approx([r0, r1], abs=1e-5)
    # row 0 pairs: (0,1): -1, (0,2): -3, (1,2): -2 -> accuracy 0, margin -2, top1 0
    assert st["accuracy"].tolist() == [0.0, 1.0]
    assert st["margin"].tolist() == pytest.approx([-2.0, 1.0])
    assert st["top1"].tolist() == [0.0, 1.0]
    losses.sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[1, 2].item() == 0.0          # padding gets no gradient
    # the best candidate is pushed up, the worst down
    assert scores.grad[0, 0] < 0 and scores.grad[0, 2] > 0


def test_plackett_luce_top1_vs_accuracy():
    # best first is highest (top1 = 1) but the last two are swapped: pairs (0,1) +, (0,2) +, (1,2) -
    _, st = plackett_luce_loss(torch.tensor([[5.0, 0.0, 1.0]]))
    assert st["top1"].item() == 1.0
    assert st["accuracy"].item() == pytest.approx(2 / 3)
    # margin: (5 + 4 - 1) / 3
    assert st["margin"].item() == pytest.approx(8 / 3)


def test_plackett_luce_k2_equals_bradley_terry():
    torch.manual_seed(0)
    s = torch.randn(6, 2)
    pl, pl_st = plackett_luce_loss(s)
    bt, bt_st = bradley_terry_loss(s[:, 0], s[:, 1])
    assert torch.allclose(pl, bt, atol=1e-6)
    assert torch.equal(pl_st["accuracy"], bt_st["accuracy"])
    assert torch.allclose(pl_st["margin"], bt_st["margin"])
    # and a K=3 list whose third entry is masked out is the same as K=2
    s3 = torch.cat([s, torch.full((6, 1), 100.0)], dim=1)
    m3 = torch.tensor([[True, True, False]]).expand(6, 3)
    assert torch.allclose(plackett_luce_loss(s3, m3)[0], bt, atol=1e-6)


def test_plackett_luce_bad_masks():
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="row 1 is not a prefix"):
        plackett_luce_loss(s, torch.tensor([[True, True, True], [True, False, True]]))
    with pytest.raises(ValueError, match="row 0 has 1 valid"):
        plackett_luce_loss(s, torch.tensor([[True, False, False], [True, True, True]]))
    with pytest.raises(ValueError, match="bool"):
        plackett_luce_loss(s, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        plackett_luce_loss(torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2"):
        plackett_luce_loss(torch.zeros(3, 1))
