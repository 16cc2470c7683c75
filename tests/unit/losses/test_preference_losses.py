import math

import pytest
import torch

from vlmalign.losses.preference import (
    PREFERENCE_LOSSES,
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


def nlsig(x: float) -> float:
    """-log sigmoid(x) = log(1 + e^-x)."""
    return math.log(1.0 + math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*xs, grad=False):
    return torch.tensor(xs, dtype=torch.float32, requires_grad=grad)


# policy chosen -1, policy rejected -2, reference -1.5 for both:
#   chosen log-ratio  pc - rc = -1 - (-1.5) =  0.5
#   rejected log-ratio pr - rr = -2 - (-1.5) = -0.5
#   h = 0.5 - (-0.5) = 1
PC, PR, RC, RR = -1.0, -2.0, -1.5, -1.5


def test_dpo_sigmoid_hand_computed():
    losses, st = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5)
    # z = beta * h = 0.5 * 1 = 0.5 -> -log sig(0.5) = log(1 + e^-0.5) = 0.474077
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-6)
    assert st["chosen_reward"].item() == pytest.approx(0.25)     # 0.5 * 0.5
    assert st["rejected_reward"].item() == pytest.approx(-0.25)  # 0.5 * -0.5
    assert st["margin"].item() == pytest.approx(0.5)
    assert st["accuracy"].item() == 1.0


def test_cdpo_label_smoothing_hand_computed_and_zero_equivalence():
    args = (t(PC), t(PR), t(RC), t(RR))
    losses, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    # 0.9 * -log sig(0.5) + 0.1 * -log sig(-0.5) = 0.9 * 0.474077 + 0.1 * 0.974077 = 0.524077
    expected = 0.9 * math.log(1 + math.exp(-0.5)) + 0.1 * math.log(1 + math.exp(0.5))
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    # eps = 0 is exactly plain DPO, and the dispatcher's "cdpo" is sigmoid with eps
    plain, _ = dpo_loss(*args, beta=0.5)
    zero, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.0)
    assert torch.equal(plain, zero)
    via, _ = preference_loss("cdpo", policy_chosen=args[0], policy_rejected=args[1],
                             ref_chosen=args[2], ref_rejected=args[3], beta=0.5, label_smoothing=0.1)
    assert torch.equal(via, losses)


def test_cdpo_at_half_pulls_margin_to_zero():
    # eps = 0.5: d/dz [0.5 (-log sig z - log sig -z)] = 0.5 (2 sig(z) - 1) > 0 for z > 0
    pc = t(PC, grad=True)
    losses, _ = dpo_loss(pc, t(PR), t(RC), t(RR), beta=0.5, label_smoothing=0.5)
    losses.sum().backward()
    # dz/dpc = beta = 0.5
    assert pc.grad.item() == pytest.approx(0.5 * (2 * sig(0.5) - 1) * 0.5, abs=1e-6)
    assert pc.grad.item() > 0


def test_dpo_gradient_signs():
    pc, pr = t(PC, -3.0, grad=True), t(PR, -1.0, grad=True)
    for loss_type in ("sigmoid", "ipo", "hinge"):
        pc.grad = pr.grad = None
        losses, _ = dpo_loss(pc, pr, t(RC, RC), t(RR, RR), beta=0.1, loss_type=loss_type)
        losses.sum().backward()
        # descending raises the chosen log-prob and lowers the rejected one
        assert (pc.grad < 0).all() and (pr.grad > 0).all(), loss_type


def test_ipo_hand_computed():
    # beta = 0.25: target margin 1 / (2 * 0.25) = 2; h = 1 -> (1 - 2)^2 = 1
    pc = t(PC, grad=True)
    losses, st = dpo_loss(pc, t(PR), t(RC), t(RR), beta=0.25, loss_type="ipo")
    assert losses.item() == pytest.approx(1.0, abs=1e-6)
    assert st["chosen_reward"].item() == pytest.approx(0.125)   # 0.25 * 0.5
    losses.sum().backward()
    # d/dpc (h - 2)^2 = 2 (h - 2) = -2
    assert pc.grad.item() == pytest.approx(-2.0, abs=1e-6)
    # at h = 1 / (2 beta) the loss is 0: beta = 0.5 -> target 1 = h
    assert dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5, loss_type="ipo")[0].item() == pytest.approx(0.0)


def test_hinge_hand_computed():
    # row 0: z = 0.5 * 1 = 0.5 -> relu(1 - 0.5) = 0.5
    # row 1: pc = 2, so h = (2 + 1.5) - (-0.5) = 4, z = 2 -> relu(1 - 2) = 0 (and no gradient)
    pc = t(PC, 2.0, grad=True)
    losses, _ = dpo_loss(pc, t(PR, PR), t(RC, RC), t(RR, RR), beta=0.5, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.5, 0.0])
    losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-0.5, 0.0])


def test_dpo_errors():
    a = t(PC)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        dpo_loss(a, a, a, a, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(a, a, a, a, label_smoothing=0.7)
    with pytest.raises(ValueError, match="only to loss_type='sigmoid'"):
        dpo_loss(a, a, a, a, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, beta=0.0)
    with pytest.raises(ValueError, match="ref_rejected is"):
        dpo_loss(a, a, a, t(1.0, 2.0))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dpo_loss(a[None], a, a, a)


def test_dpo_keeps_dtype_and_does_not_touch_inputs():
    args = [torch.tensor([PC, -0.5], dtype=torch.bfloat16) for _ in range(4)]
    before = [a.clone() for a in args]
    losses, st = dpo_loss(*args, label_smoothing=0.2)
    assert losses.dtype == torch.bfloat16 and st["accuracy"].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(args, before))


def test_simpo_hand_computed():
    c, r = t(-1.0, grad=True), t(-2.0, grad=True)
    losses, st = simpo_loss(c, r, beta=2.0, gamma=0.5)
    # 2 * (-1) - 2 * (-2) - 0.5 = -2 + 4 - 0.5 = 1.5 -> log(1 + e^-1.5) = 0.201413
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-6)
    assert st["chosen_reward"].item() == -2.0 and st["rejected_reward"].item() == -4.0
    assert st["margin"].item() == 2.0 and st["accuracy"].item() == 1.0
    losses.sum().backward()
    # d/dc = -beta (1 - sig(1.5)) < 0
    assert c.grad.item() == pytest.approx(-2.0 * (1 - sig(1.5)), abs=1e-6)
    assert r.grad.item() > 0


def test_orpo_hand_computed():
    c, r = t(-1.0, grad=True), t(-2.0, grad=True)
    nll = t(1.0)
    losses, st = orpo_loss(c, r, nll, lam=0.1)
    # log odds(-1) = -1 - log(1 - e^-1) = -1 + 0.458675 = -0.541325
    # log odds(-2) = -2 - log(1 - e^-2) = -2 + 0.145413 = -1.854587
    lo_c = -1 - math.log(1 - math.exp(-1))
    lo_r = -2 - math.log(1 - math.exp(-2))
    ratio = lo_c - lo_r                                   # 1.313262
    or_loss = math.log(1 + math.exp(-ratio))              # -log sig(ratio) = 0.240700
    assert st["log_odds_ratio"].item() == pytest.approx(ratio, abs=1e-5)
    assert st["or_loss"].item() == pytest.approx(or_loss, abs=1e-5)
    assert losses.item() == pytest.approx(1.0 + 0.1 * or_loss, abs=1e-5)
    assert st["nll"].item() == 1.0 and st["accuracy"].item() == 1.0
    losses.sum().backward()
    assert c.grad.item() < 0 and r.grad.item() > 0


def test_orpo_stable_near_zero():
    # log(1 - e^x) for x = -1e-5 is log(1e-5 - 5e-11 + ...) = -11.512930 (not log1p(-exp(x))'s
    # cancellation); avg = 0 (a certain completion) is clamped to -1e-6 instead of giving inf
    c = t(-1e-5, 0.0, grad=True)
    r = t(-3.0, -3.0)
    losses, st = orpo_loss(c, r, t(0.0, 0.0), lam=1.0)
    lo_c = -1e-5 - math.log(-math.expm1(-1e-5))          # 11.512920
    lo_r = -3 - math.log(1 - math.exp(-3))                # -2.948853
    # float32 log1p(-exp(-1e-5)) is off by 1.4e-3 here; the stable form by < 1e-5
    assert st["log_odds_ratio"][0].item() == pytest.approx(lo_c - lo_r, abs=5e-5)
    # avg = 0 behaves as avg = -1e-6: log odds = -1e-6 - log(1 - e^-1e-6) = 13.815510
    lo_0 = -1e-6 - math.log(-math.expm1(-1e-6))
    assert st["log_odds_ratio"][1].item() == pytest.approx(lo_0 - lo_r, abs=5e-5)
    assert torch.isfinite(losses).all()
    losses.sum().backward()
    assert torch.isfinite(c.grad).all()


def test_kto_hand_computed():
    policy = t(PC, PR, grad=True)
    ref = t(RC, RR)
    desirable = torch.tensor([True, False])
    kl = torch.tensor(0.2, requires_grad=True)
    losses, st = kto_loss(policy, ref, desirable, kl, beta=0.5, desirable_weight=2.0,
                          undesirable_weight=1.5)
    # r = [0.5, -0.5]
    # desirable:   2.0 * (1 - sig(0.5 * (0.5 - 0.2)))  = 2.0 * (1 - sig(0.15))
    # undesirable: 1.5 * (1 - sig(0.5 * (0.2 + 0.5)))  = 1.5 * (1 - sig(0.35))
    assert losses.tolist() == pytest.approx([2.0 * (1 - sig(0.15)), 1.5 * (1 - sig(0.35))], abs=1e-6)
    assert st["reward"].tolist() == pytest.approx([0.25, -0.25])
    assert st["desirable"].tolist() == [1.0, 0.0] and st["undesirable"].tolist() == [0.0, 1.0]
    losses.sum().backward()
    # desirable completions are pushed up, undesirable ones down; kl is a constant
    assert policy.grad[0] < 0 and policy.grad[1] > 0
    assert kl.grad is None


def test_kto_negative_kl_clamped_to_zero():
    args = (t(PC, PR), t(RC, RR), torch.tensor([True, False]))
    assert torch.equal(kto_loss(*args, torch.tensor(-1.0))[0], kto_loss(*args, 0.0)[0])
    # kl = 0, beta = 0.1: 1 - sig(0.05) and 1 - sig(0.05)
    assert kto_loss(*args, 0.0)[0].tolist() == pytest.approx([1 - sig(0.05)] * 2, abs=1e-6)


def test_kto_errors():
    with pytest.raises(ValueError, match="desirable must be a bool"):
        kto_loss(t(1.0), t(1.0), torch.tensor([1]), 0.0)
    with pytest.raises(ValueError, match="kl must be a scalar"):
        kto_loss(t(1.0, 2.0), t(1.0, 2.0), torch.tensor([True, False]), t(0.0, 0.0))


def test_listwise_dpo_hand_computed():
    # beta 0.5, policy [-1, -2, -3], ref -2 -> rewards 0.5 * [1, 0, -1] = [0.5, 0, -0.5]
    policy = t(-1.0, -2.0, -3.0)[None]
    ref = torch.full((1, 3), -2.0)
    losses, st = listwise_dpo_loss(policy, ref, beta=0.5)
    t0 = 0.5 - math.log(math.exp(0.5) + 1 + math.exp(-0.5))
    t1 = 0.0 - math.log(1 + math.exp(-0.5))
    assert losses.item() == pytest.approx(-(t0 + t1), abs=1e-6)
    assert st["accuracy"].item() == 1.0 and st["top1"].item() == 1.0
    assert st["chosen_reward"].item() == pytest.approx(0.5)


def test_listwise_dpo_k2_equals_dpo_and_mask():
    torch.manual_seed(0)
    policy, ref = torch.randn(4, 2) - 3, torch.randn(4, 2) - 3
    lw, _ = listwise_dpo_loss(policy, ref, beta=0.3)
    pair, _ = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.3)
    assert torch.allclose(lw, pair, atol=1e-6)
    # a padded third candidate changes nothing
    mask = torch.tensor([[True, True, False]]).expand(4, 3)
    pad = torch.full((4, 1), float("-inf"))
    lw3, _ = listwise_dpo_loss(torch.cat([policy, pad], 1), torch.cat([ref, pad], 1), mask, beta=0.3)
    assert torch.allclose(lw3, pair, atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        listwise_dpo_loss(policy, ref[:, :1])


def test_token_weighted_logps_hand_computed():
    lp = torch.tensor([[-1.0, -2.0, -3.0, float("-inf")],
                       [-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    w = torch.tensor([[1.0, 5.0, 1.0, 7.0], [1.0, 1.0, 1.0, 1.0]])
    out = token_weighted_logps(lp, mask, w)
    # row 0: N = 1 + 5 + 1 = 7 (the 7 is masked out); sum = -1 - 5*2 - 3 = -14 -> -14 / 7 = -2
    # row 1: all weights 1 -> plain mean over the mask: (-2 - 3 - 4) / 3 = -3
    assert out.tolist() == pytest.approx([-2.0, -3.0])
    out.sum().backward()
    # d/dlp_t = w_t / N on the mask, 0 elsewhere (no nan from the masked -inf)
    assert lp.grad[0].tolist() == pytest.approx([1 / 7, 5 / 7, 1 / 7, 0.0])
    # unnormalised: the weighted sum itself
    raw = token_weighted_logps(lp.detach(), mask, w, normalize=False)
    assert raw.tolist() == pytest.approx([-14.0, -9.0])


def test_token_weighted_logps_errors():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        token_weighted_logps(lp, torch.tensor([[True, False, False], [False, False, False]]),
                             torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask must be a bool"):
        token_weighted_logps(lp, torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="weights must be"):
        token_weighted_logps(lp, torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 2))


def test_changed_token_weights_hand_aligned():
    g = 5.0
    # row 0: chosen completion (mask True) is [5, 6, 7, 8] after two prompt positions;
    #        rejected completion is [5, 9, 7, 8] followed by one pad. Matching: 5 and 7 8;
    #        changed: chosen's 6 (position 3), rejected's 9 (position 1).
    # row 1: identical completions -> all ones.
    # row 2: rejected inserts 4: chosen [1, 2, 3] vs rejected [1, 2, 4, 3] -> only rejected's 4.
    chosen_ids = torch.tensor([[0, 0, 5, 6, 7, 8],
                               [0, 0, 1, 2, 3, 4],
                               [1, 2, 3, 0, 0, 0]])
    chosen_mask = torch.tensor([[False, False, True, True, True, True],
                                [False, False, True, True, True, True],
                                [True, True, True, False, False, False]])
    rejected_ids = torch.tensor([[5, 9, 7, 8, 0],
                                 [1, 2, 3, 4, 0],
                                 [1, 2, 4, 3, 0]])
    rejected_mask = torch.tensor([[True, True, True, True, False],
                                  [True, True, True, True, False],
                                  [True, True, True, True, False]])
    wc, wr = changed_token_weights(chosen_ids, rejected_ids, chosen_mask, rejected_mask, gamma=g)
    assert wc.shape == (3, 6) and wr.shape == (3, 5) and wc.dtype == torch.float32
    assert wc.tolist() == [[1, 1, 1, g, 1, 1], [1] * 6, [1] * 6]
    assert wr.tolist() == [[1, g, 1, 1, 1], [1] * 5, [1, 1, g, 1, 1]]


def test_changed_token_weights_feed_dense_dpo():
    # chosen [5, 6] vs rejected [5, 9]: the second token of each is changed (weight 3)
    wc, wr = changed_token_weights(torch.tensor([[5, 6]]), torch.tensor([[5, 9]]),
                                   torch.ones(1, 2, dtype=torch.bool),
                                   torch.ones(1, 2, dtype=torch.bool), gamma=3.0)
    lp = torch.tensor([[-1.0, -2.0]])
    # (1 * -1 + 3 * -2) / (1 + 3) = -7 / 4
    assert token_weighted_logps(lp, torch.ones(1, 2, dtype=torch.bool), wc).item() == pytest.approx(-1.75)
    assert wr.tolist() == [[1.0, 3.0]]
    with pytest.raises(ValueError, match="paired row by row"):
        changed_token_weights(torch.zeros(2, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                              torch.ones(2, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="rejected_mask must be a bool"):
        changed_token_weights(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                              torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))


def test_mdpo_hand_computed():
    pc = t(PC, grad=True)
    pcc = t(-3.0, grad=True)
    pr = t(PR, grad=True)
    losses, st = mdpo_loss(pc, pr, t(RC), t(RR), pcc, t(-2.0), beta=0.5,
                           cond_weight=2.0, anchor_weight=0.5)
    # c = 0.5, r = -0.5, cc = -3 - (-2) = -1
    dpo = math.log(1 + math.exp(-0.5 * (0.5 + 0.5)))     # -log sig(0.5)
    cond = math.log(1 + math.exp(-0.5 * (0.5 + 1.0)))    # -log sig(0.75)
    anc = math.log(1 + math.exp(-0.5 * 0.5))             # -log sig(0.25 - 0)
    assert losses.item() == pytest.approx(dpo + 2.0 * cond + 0.5 * anc, abs=1e-6)
    assert st["dpo_loss"].item() == pytest.approx(dpo, abs=1e-6)
    assert st["cond_loss"].item() == pytest.approx(cond, abs=1e-6)
    assert st["anchor_loss"].item() == pytest.approx(anc, abs=1e-6)
    assert st["corrupt_reward"].item() == pytest.approx(-0.5)
    assert st["cond_margin"].item() == pytest.approx(0.75) and st["cond_accuracy"].item() == 1.0
    losses.sum().backward()
    # the chosen answer with the real image goes up; with the corrupted image and the rejected
    # answer, down
    assert pc.grad.item() < 0 and pcc.grad.item() > 0 and pr.grad.item() > 0


def test_mdpo_without_extra_terms_is_dpo():
    args = (t(PC, -0.3), t(PR, -0.1), t(RC, -0.2), t(RR, -0.4))
    m, _ = mdpo_loss(*args, t(-3.0, -1.0), t(-2.0, -1.0), beta=0.5, cond_weight=0.0,
                     anchor_weight=0.0)
    d, _ = dpo_loss(*args, beta=0.5)
    assert torch.allclose(m, d)
    # anchor shifts the anchor term: anchor = 0.25 makes it -log sig(0.25 - 0.25) = log 2
    _, st = mdpo_loss(*args, t(-3.0, -1.0), t(-2.0, -1.0), beta=0.5, anchor=0.25)
    assert st["anchor_loss"][0].item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_preference_loss_dispatch():
    pair = dict(policy_chosen=t(PC), policy_rejected=t(PR), ref_chosen=t(RC), ref_rejected=t(RR),
                beta=0.5)
    for name in ("sigmoid", "ipo", "hinge"):
        assert torch.equal(preference_loss(name, **pair)[0], dpo_loss(**pair, loss_type=name)[0])
    avg = dict(policy_chosen_avg=t(-1.0), policy_rejected_avg=t(-2.0))
    assert torch.equal(preference_loss("simpo", **avg)[0], simpo_loss(**avg)[0])
    assert torch.equal(preference_loss("orpo", **avg, chosen_nll=t(1.0))[0],
                       orpo_loss(**avg, chosen_nll=t(1.0))[0])
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo", "hinge", "cdpo", "simpo", "orpo"}
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, cdpo, simpo, orpo"):
        preference_loss("dpo", **pair)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("cdpo", **pair)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss("ipo", loss_type="sigmoid", **pair)


def test_rpo_adds_alpha_times_the_chosen_nll_hand_computed():
    from vlmalign.losses.preference import with_chosen_nll
    c, r, rc, rr = t(-1.0, grad=True), t(-2.0), t(-1.5), t(-1.5)
    base, st = dpo_loss(c, r, rc, rr, beta=0.5)
    # DPO: -log sig(0.5 * ((-1 + 1.5) - (-2 + 1.5))) = -log sig(0.5) = 0.474077
    nll = -c / 4.0                                         # 4 chosen tokens: per-token NLL 0.25
    losses, st2 = with_chosen_nll(base, st, nll, alpha=2.0)
    assert base.item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-6)
    assert losses.item() == pytest.approx(0.474077 + 2.0 * 0.25, abs=1e-5)
    assert st2["nll"].item() == pytest.approx(0.25) and "nll" not in st
    losses.sum().backward()
    # d/dc = -0.5 (1 - sig(0.5)) + 2.0 * (-1/4) = -0.5 * 0.377541 - 0.5
    assert c.grad.item() == pytest.approx(-0.5 * (1 - 1 / (1 + math.exp(-0.5))) - 0.5, abs=1e-6)
    same, _ = with_chosen_nll(base, st, nll, alpha=0.0)
    assert same is base
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        with_chosen_nll(base, st, nll, alpha=-1.0)
