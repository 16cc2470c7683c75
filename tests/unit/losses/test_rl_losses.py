"""RL estimators (losses/rl.py) against hand-computed values; the arithmetic is in the comments."""

import math

import pytest
import torch

from vlmalign.losses.rl import (
    RunningMoments,
    aggregate,
    discounted_returns,
    entropy_bonus,
    entropy_from_logits,
    expand_to_tokens,
    gae,
    group_advantages,
    kl_in_reward,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    normalise_rewards,
    policy_loss_clipped,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss_clipped,
)


def t(*rows, grad=False):
    return torch.tensor(rows, dtype=torch.float32, requires_grad=grad)


def approx(x, *expected, abs=1e-6):
    vals = x.flatten().tolist() if torch.is_tensor(x) else [x]
    assert vals == pytest.approx(list(expected), abs=abs), (vals, expected)


# ----------------------------------------------------------------------------- masked statistics
def test_masked_mean_var_whiten_hand_computed():
    x = t([1.0, 2.0, 100.0], [3.0, float("nan"), float("-inf")])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # valid: 1, 2, 3 -> mean 2; padding (100, nan, -inf) is never read
    approx(masked_mean(x, m), 2.0)
    # per row: (1 + 2) / 2 = 1.5 ; 3 / 1 = 3
    approx(masked_mean(x, m, dim=1), 1.5, 3.0)
    # unbiased: ((1-2)^2 + 0 + (3-2)^2) / (3 - 1) = 2 / 2 = 1 ; biased: 2 / 3
    approx(masked_var(x, m), 1.0)
    approx(masked_var(x, m, unbiased=False), 2 / 3)
    # whiten: (x - 2) / sqrt(1 + 1e-8) -> -1, 0, 1 ; padding 0
    w = masked_whiten(x, m)
    approx(w, -1.0, 0.0, 0.0, 1.0, 0.0, 0.0, abs=1e-6)
    # shift_mean=False keeps the mean: -1 + 2, 0 + 2, 1 + 2
    approx(masked_whiten(x, m, shift_mean=False), 1.0, 2.0, 0.0, 3.0, 0.0, 0.0, abs=1e-6)


def test_masked_statistics_refuse_empty_masks():
    with pytest.raises(ValueError, match="all-false"):
        masked_mean(t([1.0, 2.0]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(t([1.0, 2.0]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="shape"):
        masked_mean(t([1.0, 2.0]), torch.tensor([[1, 0, 1]]))
    # a per-row mean of an empty row is 0, not NaN
    approx(masked_mean(t([1.0, 2.0], [5.0, 7.0]), torch.tensor([[0, 0], [1, 1]]), dim=1), 0.0, 6.0)


def test_expand_to_tokens():
    out = expand_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match=r"\(B,\)"):
        expand_to_tokens(torch.zeros(2, 1), torch.ones(2, 3))


# ----------------------------------------------------------------------------- GAE
def test_gae_hand_computed_with_padding_and_bootstrap_zero():
    gamma, lam = 0.9, 0.5
    rewards = t([0.0, 0.0, 1.0], [0.5, 7.0, 7.0])      # row 1: one valid token, padding ignored
    values = t([0.5, 0.2, 0.4], [0.1, 9.0, 9.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    # row 0, backwards, V after the last token = 0:
    #   t=2: delta = 1 + 0.9*0 - 0.4 = 0.6                         A2 = 0.6
    #   t=1: delta = 0 + 0.9*0.4 - 0.2 = 0.16  A1 = 0.16 + 0.9*0.5*0.6 = 0.16 + 0.27 = 0.43
    #   t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32 A0 = -0.32 + 0.45*0.43 = -0.32 + 0.1935 = -0.1265
    # row 1: t=0 is the last valid token: delta = 0.5 + 0 - 0.1 = 0.4 ; padding -> 0
    approx(adv, -0.1265, 0.43, 0.6, 0.4, 0.0, 0.0)
    # returns = A + V: -0.1265 + 0.5 = 0.3735, 0.43 + 0.2 = 0.63, 0.6 + 0.4 = 1.0 ; 0.4 + 0.1 = 0.5
    approx(ret, 0.3735, 0.63, 1.0, 0.5, 0.0, 0.0)
    assert not adv.requires_grad


def test_gae_lambda_one_is_return_minus_value_and_discounted_returns():
    rewards = t([1.0, 2.0, 3.0])
    values = t([0.5, 0.5, 0.5])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # gamma 0.5: G2 = 3 ; G1 = 2 + 0.5*3 = 3.5 ; G0 = 1 + 0.5*3.5 = 2.75
    approx(discounted_returns(rewards, mask, gamma=0.5), 2.75, 3.5, 3.0)
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    approx(adv, 2.25, 3.0, 2.5)       # G - V
    approx(ret, 2.75, 3.5, 3.0)       # = G


def test_gae_rejects_left_padding_and_bad_settings():
    r = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="right-padded"):
        gae(r, r, torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="lam"):
        gae(r, r, torch.ones(1, 3), lam=1.5)
    with pytest.raises(ValueError, match="values"):
        gae(r, torch.zeros(1, 4), torch.ones(1, 3))


# ----------------------------------------------------------------------------- group baselines
def test_group_advantages_grpo_and_dr_grpo():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])     # 2 prompts x k=4
    # group 0: mean 0.5 ; unbiased std = sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.577350
    #   A = +-0.5 / (0.577350 + 1e-6) = +-0.866024
    # group 1: all equal -> 0
    s = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    approx(group_advantages(r, k=4), s, -s, -s, s, 0.0, 0.0, 0.0, 0.0, abs=1e-5)
    # Dr. GRPO: no std scaling: r - mean
    approx(group_advantages(r, k=4, scale_std=False), 0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0)
    # (B, k) input keeps its shape
    assert group_advantages(r.view(2, 4), k=4).shape == (2, 4)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.zeros(6), k=4)
    with pytest.raises(ValueError, match="k"):
        group_advantages(torch.zeros(4), k=1)


def test_rloo_advantages_leave_one_out():
    r = torch.tensor([[1.0, 2.0, 6.0]])
    # A_0 = 1 - (2 + 6)/2 = -3 ; A_1 = 2 - (1 + 6)/2 = -1.5 ; A_2 = 6 - (1 + 2)/2 = 4.5
    approx(rloo_advantages(r, k=3), -3.0, -1.5, 4.5)
    # = k/(k-1) (r - mean) = 1.5 * (r - 3) = -3, -1.5, 4.5
    approx(rloo_advantages(r.flatten(), k=3), -3.0, -1.5, 4.5)


def test_reinforce_pp_global_whitening():
    rewards = t([0.0, 1.0], [2.0, 0.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    # returns (gamma 1): row 0: [0 + 1, 1] = [1, 1] ; row 1: [2]  (its padded 0 is ignored)
    # global over the 3 valid tokens: mean 4/3 ; unbiased var = (1/9 + 1/9 + 4/9) / 2 = 1/3
    #   A = (1 - 4/3) / sqrt(1/3) = -0.577350 ; (2 - 4/3) / sqrt(1/3) = 1.154701
    a = -1 / 3 / math.sqrt(1 / 3)
    approx(reinforce_pp_advantages(rewards, mask), a, a, 2 / 3 / math.sqrt(1 / 3), 0.0, abs=1e-6)
    # (B,) sequence rewards are spread over the valid tokens first: [3, 3], [1] -> mean 7/3,
    # var = (4/9 + 4/9 + 16/9) / 2 = 4/3 ; A = (2/3) / sqrt(4/3) = 0.577350, (-4/3)/sqrt(4/3) = -1.154701
    s = math.sqrt(4 / 3)
    approx(reinforce_pp_advantages(torch.tensor([3.0, 1.0]), mask), 2 / 3 / s, 2 / 3 / s, -4 / 3 / s, 0.0)


# ----------------------------------------------------------------------------- KL
def test_kl_estimators_hand_computed():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    # log r = ref - logp = [-0.5, 1.0]
    approx(kl_penalty(logp, ref, "k1"), 0.5, -1.0)                       # -log r
    approx(kl_penalty(logp, ref, "k2"), 0.125, 0.5)                      # (log r)^2 / 2
    # k3 = e^{log r} - 1 - log r: e^-0.5 - 1 + 0.5 = 0.106531 ; e^1 - 1 - 1 = 0.718282
    approx(kl_penalty(logp, ref, "k3"), math.exp(-0.5) - 0.5, math.e - 2)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_are_unbiased_for_kl_pi_ref():
    # pi = [0.7, 0.3], ref = [0.4, 0.6]: KL(pi||ref) = 0.7 ln(0.7/0.4) + 0.3 ln(0.3/0.6)
    #                                              = 0.391736 - 0.207944 = 0.183792
    pi, ref = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    kl = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    for kind in ("k1", "k3"):   # exact expectation under samples from pi
        est = (pi * kl_penalty(pi.log(), ref.log(), kind)).sum()
        assert est.item() == pytest.approx(kl, abs=1e-6), kind


def test_kl_in_reward_places_score_on_last_token():
    logp = t([-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0])
    ref = t([-1.5, -1.0, -0.5], [-1.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    r = kl_in_reward(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    # k1 per token = logp - ref: row 0 [0.5, 0, -0.5], row 1 [-1]
    # reward = -0.1 * k1 (+ score at the last valid token):
    #   row 0: [-0.05, 0, 0.05 + 2] ; row 1: [0.1 - 1] = [-0.9], padding 0
    approx(r, -0.05, 0.0, 2.05, -0.9, 0.0, 0.0)
    with pytest.raises(ValueError, match="no valid token"):
        kl_in_reward(torch.tensor([1.0]), logp[:1], ref[:1], torch.zeros(1, 3), kl_coef=0.1)


# ----------------------------------------------------------------------------- policy loss
def _ppo_inputs():
    # ratios: e^{ln 1.5} = 1.5, e^{ln 0.5} = 0.5, e^0 = 1 ; third token padded in row 0
    old = t([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    new = t([math.log(1.5), math.log(0.5), 9.0], [0.0, math.log(1.1), 0.0], grad=True)
    adv = t([1.0, 1.0, 5.0], [-2.0, -1.0, 0.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    return new, old, adv, mask


def test_policy_loss_clipped_hand_computed():
    new, old, adv, mask = _ppo_inputs()
    loss, st = policy_loss_clipped(new, old, adv, mask, clip_eps=0.2)
    # per token l = max(-A rho, -A clip(rho, 0.8, 1.2)):
    #   (A=1, rho=1.5): max(-1.5, -1.2) = -1.2   (clipped)
    #   (A=1, rho=0.5): max(-0.5, -0.8) = -0.5
    #   (A=-2, rho=1):  max(2, 2) = 2
    #   (A=-1, rho=1.1): max(1.1, 1.1) = 1.1
    # token_mean: (-1.2 - 0.5 + 2 + 1.1) / 4 = 1.4 / 4 = 0.35
    approx(loss, 0.35)
    approx(st["clipfrac"], 0.25)                       # 1 of 4 tokens clipped
    approx(st["ratio_mean"], (1.5 + 0.5 + 1 + 1.1) / 4)
    approx(st["ratio_max"], 1.5)
    # approx_kl: mean of (rho - 1) - ln rho = [0.5 - ln1.5, -0.5 - ln0.5, 0, 0.1 - ln1.1] / 4
    approx(st["approx_kl"], (0.5 - math.log(1.5) - 0.5 + math.log(2) + 0.1 - math.log(1.1)) / 4)
    loss.backward()
    # d l / d logp = -A rho where unclipped, 0 where clipped; divided by 4 tokens:
    #   token (0,0) clipped -> 0 ; (0,1): -1*0.5/4 = -0.125 ; (1,0): 2*1/4 = 0.5 ; (1,1): 1.1/4 = 0.275
    approx(new.grad, 0.0, -0.125, 0.0, 0.5, 0.275, 0.0)


def test_policy_loss_aggregations_and_clip_higher():
    new, old, adv, mask = _ppo_inputs()
    # clip-higher eps_high = 0.6: (A=1, rho=1.5) is no longer clipped -> -1.5
    loss, st = policy_loss_clipped(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    approx(loss, (-1.5 - 0.5 + 2 + 1.1) / 4)           # = 1.1 / 4 = 0.275
    approx(st["clipfrac"], 0.0)
    # seq_mean_token_mean: row 0 mean (-1.2 - 0.5)/2 = -0.85 ; row 1 (2 + 1.1)/2 = 1.55 ; /2 = 0.35
    loss, _ = policy_loss_clipped(new, old, adv, mask, agg="seq_mean_token_mean")
    approx(loss, (-0.85 + 1.55) / 2)
    # token_sum_norm with a constant L = 10: 1.4 / (2 rows * 10) = 0.07
    loss, _ = policy_loss_clipped(new, old, adv, mask, agg="token_sum_norm", norm_len=10)
    approx(loss, 1.4 / 20)
    # default L = T = 3: 1.4 / 6
    loss, _ = policy_loss_clipped(new, old, adv, mask, agg="token_sum_norm")
    approx(loss, 1.4 / 6)
    with pytest.raises(ValueError, match="agg"):
        policy_loss_clipped(new, old, adv, mask, agg="mean")


def test_policy_loss_dual_clip():
    old = t([0.0])
    new = t([math.log(4.0)])
    adv = t([-1.0])
    # rho = 4, A = -1: max(4, 1.2) = 4 ; dual clip c = 3 bounds it: min(4, -3 * -1) = 3
    loss, _ = policy_loss_clipped(new, old, adv, torch.ones(1, 1), dual_clip=3.0)
    approx(loss, 3.0)
    loss, _ = policy_loss_clipped(new, old, adv, torch.ones(1, 1))
    approx(loss, 4.0)


def test_policy_loss_micro_batches_with_global_count_equal_full_batch():
    torch.manual_seed(0)
    new = torch.randn(4, 5, requires_grad=True)
    old, adv = torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    for agg, n in (("token_mean", int(mask.sum())), ("seq_mean_token_mean", 4), ("token_sum_norm", 4)):
        full, _ = policy_loss_clipped(new, old, adv, mask, agg=agg, norm_len=8)
        halves = sum(policy_loss_clipped(new[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], agg=agg,
                                         num_items=n, norm_len=8)[0] for i in (0, 2))
        assert halves.item() == pytest.approx(full.item(), abs=1e-6), agg
        # without the global count, token_mean of halves is a mean of means: different here
        if agg == "token_mean":
            local = sum(policy_loss_clipped(new[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2])[0] / 2
                        for i in (0, 2))
            assert abs(local.item() - full.item()) > 1e-3


# ----------------------------------------------------------------------------- value loss
def test_value_loss_clipped_hand_computed():
    values = t([1.0, 0.0, 5.0], grad=True)
    old = t([0.5, 0.0, 0.0])
    ret = t([2.0, 0.5, 0.0])
    mask = torch.tensor([[1, 1, 0]])
    loss, st = value_loss_clipped(values, old, ret, mask, clip_range=0.2)
    # token 0: v=1, old=0.5 -> v_clip = 0.5 + 0.2 = 0.7 ; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69
    # token 1: v=0, old=0   -> v_clip = 0 ; (0-0.5)^2 = 0.25 both -> 0.25
    # 0.5 * (1.69 + 0.25) / 2 = 0.485
    approx(loss, 0.485)
    approx(st["vf_clipfrac"], 0.5)
    approx(st["value_mean"], 0.5)                      # (1 + 0) / 2
    approx(st["value_error"], (1.0 + 0.25) / 2)
    loss.backward()
    # token 0 uses the clipped branch, whose v_clip does not move with v (outside the clip) -> 0
    # token 1: 0.5 * 2 (v - R) / 2 = (0 - 0.5) / 2 = -0.25
    approx(values.grad, 0.0, -0.25, 0.0)
    loss, st = value_loss_clipped(values, old, ret, mask, clip_range=None)
    approx(loss, 0.5 * (1.0 + 0.25) / 2)               # = 0.3125
    approx(st["vf_clipfrac"], 0.0)


# ----------------------------------------------------------------------------- entropy
def test_entropy_from_logits_and_bonus():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])   # (1, 2, V=2)
    # uniform over 2: ln 2 = 0.693147 ; p = [0.75, 0.25]: -(0.75 ln0.75 + 0.25 ln0.25) = 0.562335
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    H = entropy_from_logits(logits)
    approx(H, math.log(2), h2)
    approx(entropy_from_logits(logits, chunk_size=1), math.log(2), h2)
    # a -inf logit (banned token) contributes 0, not NaN
    approx(entropy_from_logits(torch.tensor([0.0, 0.0, float("-inf")])), math.log(2))
    loss, st = entropy_bonus(H, torch.tensor([[1, 0]]), coef=0.01)
    approx(loss, -0.01 * math.log(2))                  # only the first token is valid
    approx(st["entropy"], math.log(2))


# ----------------------------------------------------------------------------- running moments
def test_running_moments_match_all_data_and_normalise():
    rm = RunningMoments()
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 9.0])
    bm, bs = rm.update(a)
    assert (bm, bs) == pytest.approx((2.0, 1.0))      # batch std: sqrt((1 + 0 + 1) / 2) = 1
    rm.update(b)
    # all five: mean 20/5 = 4 ; deviations -3 -2 -1 1 5 -> squares 9 4 1 1 25 = 40 ; /4 = 10
    assert rm.count == 5 and rm.mean == pytest.approx(4.0) and rm.var == pytest.approx(10.0)
    # normalise without update: (r - 4) / sqrt(10): 14 -> 3.162278, clipped to 2
    r = normalise_rewards(torch.tensor([14.0, 4.0]), rm, update=False)
    approx(r, 10 / math.sqrt(10), 0.0, abs=1e-6)
    approx(normalise_rewards(torch.tensor([14.0, 4.0]), rm, clip=2.0, update=False), 2.0, 0.0)
    approx(normalise_rewards(torch.tensor([14.0]), rm, shift_mean=False, update=False), 14 / math.sqrt(10))
    copy = RunningMoments()
    copy.load_state_dict(rm.state_dict())
    assert copy.state_dict() == rm.state_dict()
    with pytest.raises(ValueError, match="non-finite"):
        rm.update(torch.tensor([float("nan")]))


def test_normalise_rewards_updates_first():
    rm = RunningMoments()
    # first batch [0, 2]: mean 1, std sqrt(2) -> [-1/sqrt2, 1/sqrt2]
    approx(normalise_rewards(torch.tensor([0.0, 2.0]), rm), -1 / math.sqrt(2), 1 / math.sqrt(2))
    with pytest.raises(ValueError, match="seen no data"):
        normalise_rewards(torch.tensor([1.0]), RunningMoments(), update=False)


def test_aggregate_rejects_bad_norm_len():
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(torch.ones(1, 2), torch.ones(1, 2), "token_sum_norm", norm_len=0)


def test_entropy_gradient_stays_finite_with_banned_tokens():
    z = torch.tensor([0.0, 1.0, float("-inf")], requires_grad=True)
    entropy_from_logits(z).backward()
    assert torch.isfinite(z.grad).all() and z.grad[2] == 0


def test_package_reexports():
    import vlmalign.losses as L
    assert L.gae is gae and L.policy_loss_clipped is policy_loss_clipped and L.RunningMoments is RunningMoments


def _two_process_sum():
    """A sum over two 'processes' (threads) that meet at each call, as an all-reduce does."""
    import threading
    barrier, slots = threading.Barrier(2), [None, None]

    def make(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            out = slots[0] + slots[1]
            barrier.wait()
            return out
        return reduce
    return make(0), make(1)


def test_whitening_over_processes_equals_whitening_the_whole_batch():
    """masked_whiten / reinforce_pp_advantages with ``reduce``: each process's rows whitened with
    the statistics of every process's tokens, as one process holding all rows would."""
    import threading
    from vlmalign.losses.rl import masked_whiten, reinforce_pp_advantages
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5])
    mask = torch.arange(5)[None, :] < lengths[:, None]      # right-padded responses
    whole = {"w": masked_whiten(x, mask), "pp": reinforce_pp_advantages(x, mask)}
    halves = [(x[:2], mask[:2]), (x[2:], mask[2:])]     # unequal shares: 2 rows and 4 rows
    out = [{}, {}]
    reducers = _two_process_sum()

    def run(rank):
        xs, ms = halves[rank]
        out[rank]["w"] = masked_whiten(xs, ms, reduce=reducers[rank])
        out[rank]["pp"] = reinforce_pp_advantages(xs, ms, reduce=reducers[rank])
    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in ("w", "pp"):
        assert torch.allclose(torch.cat([out[0][key], out[1][key]]), whole[key], atol=1e-6)
        # whitening each half on its own would not
        assert not torch.allclose(masked_whiten(*halves[0]), whole["w"][:2], atol=1e-3)
