"""Online-RL estimators: advantages, policy/value losses, KL penalties, entropy, reward scaling.

Pure tensor functions for PPO (with a critic), GRPO, Dr. GRPO, RLOO and REINFORCE++; the RL
trainers gather log-probs and values and call these. Conventions:

* Token tensors are (B, T) over RESPONSE tokens: ``logprobs[b, t]`` is the log-prob of response
  token t of row b. ``mask`` (B, T) (bool or 0/1) marks the valid tokens; rows are right-padded
  (valid tokens first, padding after). Values at padded positions are never read, even when
  they are NaN or -inf (``torch.where``, not multiplication).
* Losses return ``(loss, stats)``: ``loss`` is a 0-dim tensor already divided by ``num_items``
  (default: the count in this batch; pass the count over every micro-batch and process of an
  optimizer step so accumulated and distributed gradients equal the single-batch gradient, as
  the engine does, see docs/TRAINING.md). ``stats`` holds detached 0-dim tensors: means over
  the valid tokens of this batch.
* Advantage / reward helpers compute under ``torch.no_grad`` and return detached tensors:
  they are targets, not things to differentiate.
* Settings that make no sense raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "token_sum_norm")
KL_KINDS = ("k1", "k2", "k3")


# ----------------------------------------------------------------------------- checks
def _as_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    if not torch.is_tensor(mask):
        raise ValueError(f"{name} must be a tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    return mask.bool()


def _check_tokens(mask: torch.Tensor | None = None, **tensors: torch.Tensor) -> torch.Tensor:
    """All tensors (B, T) of one shape; return the bool mask (checked against them)."""
    shape = None
    for name, x in tensors.items():
        if not torch.is_tensor(x) or x.dim() != 2:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be a (B, T) tensor over response tokens, got {got}")
        if shape is None:
            shape = x.shape
        elif x.shape != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} like "
                             f"{next(iter(tensors))}")
    first = next(iter(tensors.values()))
    return _as_mask(mask, first) if mask is not None else torch.ones_like(first, dtype=torch.bool)


def _check_right_padded(mask: torch.Tensor) -> None:
    bad = (mask[:, 1:] & ~mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"mask rows {bad} are not right-padded (a valid token follows a padded one)")


def _zero(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask, else 0 (also where x is NaN/inf)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _denominator(num_items, default: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    d = default if num_items is None else num_items
    return torch.as_tensor(d, dtype=like.dtype, device=like.device).clamp_min(1)


# ----------------------------------------------------------------------------- masked statistics
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is true (padding values are never read)."""
    m = _as_mask(mask, x)
    z = _zero(x, m)
    return z.sum() if dim is None else z.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """mean_{mask} x = sum(x * m) / sum(m).

    ``dim=None``: over every valid element (an all-false mask raises: there is no mean). With
    ``dim``: per slice; a slice without valid elements gives 0 (an empty response contributes
    nothing rather than NaN).
    """
    m = _as_mask(mask, x)
    if dim is None:
        n = m.sum()
        if int(n) == 0:
            raise ValueError("masked_mean over an all-false mask")
        return _zero(x, m).sum() / n
    n = m.sum(dim=dim)
    return _zero(x, m).sum(dim=dim) / n.clamp_min(1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid elements: sum m (x - mean)^2 / (n - 1) (``unbiased``, Bessel's
    correction, as ``torch.var`` by default) or / n. Needs n >= 2 (unbiased) or n >= 1."""
    m = _as_mask(mask, x)
    n = int(m.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid elements, got {n}")
    mean = _zero(x, m).sum() / n
    sq = _zero((x - mean) ** 2, m).sum()
    return sq / (n - 1 if unbiased else n)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8, reduce=None) -> torch.Tensor:
    """Whitening over the valid elements of the whole tensor (PPO advantage normalisation):

        y = (x - mean) / sqrt(var + eps)          (shift_mean=True)
        y = (x - mean) / sqrt(var + eps) + mean   (shift_mean=False: rescale only)

    ``var`` is the UNBIASED variance (n - 1 in the denominator), the convention of ``torch.std``
    and of most PPO code; with thousands of tokens the choice does not matter, with a handful it
    is documented here so tests can pin it. Padded positions come out as 0. The statistics are
    those of this tensor, or, with ``reduce`` (a function that sums a tensor over processes,
    e.g. the engine's all-reduce), those of the valid elements of every process's tensor: the
    count, the sum and then the squared deviations from the global mean are summed over
    processes, so several processes whiten as one process holding all their rows would.
    """
    m = _as_mask(mask, x)
    if reduce is not None:
        n = reduce(m.sum().to(x.dtype).reshape(1))[0]
        if float(n) < 2:
            raise ValueError(f"masked_whiten needs at least 2 valid elements over all processes, got {int(n)}")
        mean = reduce(_zero(x, m).sum().reshape(1))[0] / n
        var = reduce(_zero((x - mean) ** 2, m).sum().reshape(1))[0] / (n - 1)
        y = (x - mean) * torch.rsqrt(var + eps)
        return _zero(y if shift_mean else y + mean, m)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return _zero(y, m)


def expand_to_tokens(seq_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) per-sequence values (e.g. GRPO/RLOO advantages) -> (B, T): the value on every valid
    token of its row, 0 on padding."""
    if not torch.is_tensor(seq_values) or seq_values.dim() != 1:
        got = tuple(seq_values.shape) if torch.is_tensor(seq_values) else type(seq_values).__name__
        raise ValueError(f"seq_values must be a (B,) tensor, got {got}")
    if not torch.is_tensor(mask) or mask.dim() != 2 or mask.shape[0] != seq_values.shape[0]:
        got = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask must be ({seq_values.shape[0]}, T), got {got}")
    x = seq_values[:, None].expand(mask.shape)
    return _zero(x, mask.bool())


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str = "token_mean",
              num_items=None, norm_len: int | None = None) -> torch.Tensor:
    """Reduce per-token losses (B, T) to a scalar.

    * ``token_mean``: sum_{b,t} m l / N_tok. Every token weighs the same; long answers weigh
      more in total (DAPO, Yu et al. 2025, "token-level policy gradient loss").
      ``num_items`` = the valid-token count over the whole step.
    * ``seq_mean_token_mean``: (1 / N_seq) sum_b [ sum_t m l / |o_b| ], each sequence weighs
      the same (the GRPO paper's 1/G sum_i 1/|o_i| sum_t; Shao et al. 2024). ``num_items`` = the
      number of sequences over the whole step.
    * ``token_sum_norm``: sum_{b,t} m l / (N_seq * L) with a CONSTANT L = ``norm_len`` (default
      T; pass the generation budget, e.g. max_new_tokens, so it does not vary between batches).
      Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): no length
      normalisation per sequence, so long wrong answers are not favoured. ``num_items`` = the
      number of sequences over the whole step.
    """
    m = _as_mask(mask, loss)
    z = _zero(loss, m)
    if agg == "token_mean":
        return z.sum() / _denominator(num_items, m.sum(), z)
    if agg == "seq_mean_token_mean":
        per_seq = z.sum(dim=1) / m.sum(dim=1).clamp_min(1).to(z.dtype)   # (B,)
        return per_seq.sum() / _denominator(num_items, m.shape[0], z)
    if agg == "token_sum_norm":
        L = loss.shape[1] if norm_len is None else norm_len
        if not L > 0:
            raise ValueError(f"norm_len must be > 0, got {norm_len}")
        return z.sum() / (_denominator(num_items, m.shape[0], z) * L)
    raise ValueError(f"unknown agg {agg!r}; expected one of {', '.join(AGGREGATIONS)}")


# ----------------------------------------------------------------------------- advantages
@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation"), token level:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                                   (the value targets)

    with V_{t+1} = 0 and A_{t+1} = 0 after each row's last valid token (the episode ends
    there: no bootstrap). rewards, values, mask: (B, T); rows right-padded. Returns detached
    ``(advantages, returns)`` (B, T), 0 on padding. ``lam = 1`` gives Monte-Carlo returns minus
    V; ``values = 0, lam = 1`` gives the discounted return-to-go.
    """
    m = _check_tokens(mask, rewards=rewards, values=values)
    _check_right_padded(m)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    r = _zero(rewards, m)
    v = _zero(values, m)
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_v = torch.zeros(B, dtype=r.dtype, device=r.device)
    next_a = torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * next_a
        a = _zero(a, m[:, t])
        adv[:, t] = a
        # right padding: a padded t leaves zeros behind, so t-1 (the last valid) bootstraps 0
        next_v, next_a = v[:, t], a
    return adv, _zero(adv + v, m)


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over each row's valid tokens (the return-to-go);
    GAE with V = 0 and lam = 1."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)[0]


def _grouped(rewards: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple]:
    if not torch.is_tensor(rewards) or rewards.dim() not in (1, 2):
        got = tuple(rewards.shape) if torch.is_tensor(rewards) else type(rewards).__name__
        raise ValueError(f"rewards must be (B*k,) or (B, k), got {got}")
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k (samples per prompt) must be an int >= 2, got {k!r}")
    if rewards.dim() == 2:
        if rewards.shape[1] != k:
            raise ValueError(f"rewards is {tuple(rewards.shape)} but k={k}")
        return rewards, rewards.shape
    if rewards.shape[0] % k:
        raise ValueError(f"{rewards.shape[0]} rewards are not a multiple of k={k} (each prompt's k "
                         "samples must be adjacent)")
    return rewards.view(-1, k), rewards.shape


@torch.no_grad()
def group_advantages(rewards: torch.Tensor, k: int, scale_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages, one per sampled response (GRPO, Shao et al. 2024,
    "DeepSeekMath"; outcome supervision):

        A_i = (r_i - mean_g r) / (std_g r + eps)      scale_std=True  (GRPO)
        A_i =  r_i - mean_g r                         scale_std=False (Dr. GRPO, Liu et al. 2025:
                                                      no std scaling, which over-weights groups
                                                      that are nearly all right or all wrong)

    over the k responses of the same prompt. ``std`` is the UNBIASED group standard deviation
    (k - 1 in the denominator; ``torch.std``'s default). rewards: (B*k,) with each prompt's k
    samples adjacent, or (B, k); the result has the input's shape. A group whose rewards are all
    equal gets advantages 0 (no signal).
    """
    g, shape = _grouped(rewards, k)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(shape)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; for RLHF: Ahmadian et al. 2024, "Back to
    Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs"):
    the baseline of sample i is the mean reward of the OTHER k - 1 samples of its prompt,

        A_i = r_i - 1/(k-1) sum_{j != i} r_j = k/(k-1) * (r_i - mean_g r).

    rewards: (B*k,) adjacent groups or (B, k); result in the input's shape.
    """
    g, shape = _grouped(rewards, k)
    others = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - others).reshape(shape)


@torch.no_grad()
def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            eps: float = 1e-8, reduce=None) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models"): the return-to-go of token rewards, whitened over the GLOBAL batch (every
    valid token of every prompt), no critic and no per-prompt baseline:

        G_t = sum_{s >= t} gamma^(s - t) r_s ;   A = (G - mean_batch G) / sqrt(var_batch G + eps)

    rewards: (B, T) token rewards, usually from :func:`kl_in_reward` (score at the last token,
    -beta * KL per token); or (B,) per-sequence rewards (e.g. group-mean-subtracted scores:
    "REINFORCE++-baseline"), which are spread over each row's valid tokens first. The mean and
    (unbiased) variance are those of this tensor; over several processes pass ``reduce`` (see
    :func:`masked_whiten`): the statistics are then those of every process's tokens.
    """
    if torch.is_tensor(rewards) and rewards.dim() == 1:
        returns = expand_to_tokens(rewards, mask)
        m = mask.bool()
    else:
        m = _check_tokens(mask, rewards=rewards)
        returns = discounted_returns(rewards, m, gamma)
    return masked_whiten(returns, m, shift_mean=True, eps=eps, reduce=reduce)


# ----------------------------------------------------------------------------- KL
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(pi || ref) from tokens SAMPLED FROM pi (Schulman 2020,
    "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html). With
    log r = ref_logp - logp (r = ref/pi):

        k1 = -log r       = logp - ref_logp             unbiased, can be negative, high variance
        k2 = (log r)^2 / 2                              biased (low for close policies), >= 0
        k3 = (r - 1) - log r
           = exp(ref_logp - logp) - (ref_logp - logp) - 1   unbiased, >= 0, low variance

    Shapes broadcast; no masking (mask the result). Differentiable: as a loss term (GRPO's
    k3 penalty, Shao et al. 2024) gradients flow into ``logprobs``.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    return torch.expm1(log_r) - log_r


@torch.no_grad()
def kl_in_reward(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                 mask: torch.Tensor, kl_coef: float, kind: str = "k1") -> torch.Tensor:
    """Token rewards with the KL penalty folded in (Ziegler et al. 2019, "Fine-Tuning Language
    Models from Human Preferences"; InstructGPT, Ouyang et al. 2022):

        r_t = -kl_coef * kl_t  +  [t == last valid token] * score

    with kl_t = :func:`kl_penalty` (``kind``) on valid tokens. scores: (B,) sequence rewards;
    logprobs, ref_logprobs, mask: (B, T), right-padded, each row with at least one valid token.
    Returns detached (B, T) rewards, 0 on padding.
    """
    m = _check_tokens(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    _check_right_padded(m)
    if not torch.is_tensor(scores) or scores.shape != (m.shape[0],):
        got = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise ValueError(f"scores must be ({m.shape[0]},), got {got}")
    n = m.sum(dim=1)
    empty = (n == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no valid token to carry the score")
    kl = kl_penalty(logprobs, ref_logprobs, kind)
    rewards = _zero(-kl_coef * kl, m)
    last = (n - 1)[:, None]                                             # (B, 1)
    return rewards.scatter_add(1, last, scores.to(rewards.dtype)[:, None])


# ----------------------------------------------------------------------------- losses
def policy_loss_clipped(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                        agg: str = "token_mean", num_items=None, norm_len: int | None = None,
                        dual_clip: float | None = None):
    """PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms"), per token, to MINIMISE:

        rho_t = exp(logp_t - old_logp_t)
        l_t   = max( -A_t rho_t , -A_t clip(rho_t, 1 - eps_low, 1 + eps_high) )

    eps_low = ``clip_eps``; eps_high = ``clip_eps_high`` (default = eps_low). A larger eps_high
    is DAPO's "clip-higher" (Yu et al. 2025), which lets unlikely tokens gain probability and
    keeps entropy from collapsing. ``dual_clip`` = c > 1 also bounds the loss of negative
    advantages by -c A_t (dual-clip PPO, Ye et al. 2020). The per-token losses are reduced by
    :func:`aggregate` (``agg``: token_mean | seq_mean_token_mean | token_sum_norm (Dr. GRPO),
    ``num_items``, ``norm_len``). For GRPO/RLOO pass the sequence advantage on every token
    (:func:`expand_to_tokens`); with old_logprobs = logprobs.detach() (one update per batch)
    rho = 1 and the gradient is the plain policy gradient.

    Shapes (B, T). Returns ``(loss, stats)``: ``clipfrac`` (share of valid tokens where the
    clipped term is the larger one, i.e. the gradient is cut), ``approx_kl`` (mean of the k3
    estimate of KL(old || new): (rho - 1) - log rho, samples from the old policy), ``ratio_mean``,
    ``ratio_max``.
    """
    m = _check_tokens(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not 0 <= eps_low < 1:
        raise ValueError(f"clip_eps must be in [0, 1), got {clip_eps}")
    if not eps_high >= 0:
        raise ValueError(f"clip_eps_high must be >= 0, got {clip_eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = _zero(logprobs - old_logprobs, m)                      # padding: ratio 1
    ratio = torch.exp(log_ratio)
    adv = _zero(advantages, m)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        bounded = torch.minimum(per_token, -dual_clip * adv)
        per_token = torch.where(adv < 0, bounded, per_token)
    loss = aggregate(per_token, m, agg, num_items=num_items, norm_len=norm_len)
    with torch.no_grad():
        n = m.sum().clamp_min(1)
        lr = log_ratio.detach()
        stats = {
            "clipfrac": _zero((clipped > unclipped).to(ratio.dtype), m).sum() / n,
            "approx_kl": _zero(torch.expm1(lr) - lr, m).sum() / n,
            "ratio_mean": _zero(ratio.detach(), m).sum() / n,
            "ratio_max": torch.where(m, ratio.detach(), torch.full_like(ratio, -math.inf)).max()
            if bool(m.any()) else torch.ones((), dtype=ratio.dtype, device=ratio.device),
        }
    return loss, stats


def value_loss_clipped(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip_range: float | None = 0.2, agg: str = "token_mean",
                       num_items=None, norm_len: int | None = None):
    """PPO's clipped value loss (Schulman et al. 2017; the form of OpenAI baselines), per token:

        v_clip = old_v + clip(v - old_v, -c, c)
        l_t    = 0.5 * max( (v - R)^2 , (v_clip - R)^2 )

    c = ``clip_range`` (None: no clipping, l_t = 0.5 (v - R)^2). R = the GAE returns. Reduced by
    :func:`aggregate`. Returns ``(loss, stats)``: ``vf_clipfrac`` (share of valid tokens where
    the clipped error is the larger), ``value_mean``, ``value_error`` (mean (v - R)^2).
    """
    m = _check_tokens(mask, values=values, old_values=old_values, returns=returns)
    R = _zero(returns, m)
    v = _zero(values, m)
    err = (v - R) ** 2
    if clip_range is None:
        per_token = 0.5 * err
        clipped_more = torch.zeros_like(err, dtype=torch.bool)
    else:
        if not clip_range > 0:
            raise ValueError(f"clip_range must be > 0 or None, got {clip_range}")
        old = _zero(old_values, m)
        v_clip = old + torch.clamp(v - old, -clip_range, clip_range)
        err_clip = (v_clip - R) ** 2
        per_token = 0.5 * torch.maximum(err, err_clip)
        clipped_more = err_clip > err
    loss = aggregate(per_token, m, agg, num_items=num_items, norm_len=norm_len)
    with torch.no_grad():
        n = m.sum().clamp_min(1)
        stats = {
            "vf_clipfrac": _zero(clipped_more.to(v.dtype), m).sum() / n,
            "value_mean": v.detach().sum() / n,
            "value_error": err.detach().sum() / n,
        }
    return loss, stats


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: H = logsumexp(z) - sum_v softmax(z)_v z_v
    (the same as -sum p log p, without computing log 0). (..., V) -> (...), in float32 or the
    input's wider dtype. ``chunk_size`` bounds memory by processing that many rows of the
    flattened leading dims at a time (full-vocabulary intermediates are large)."""
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    dtype = torch.promote_types(logits.dtype, torch.float32)

    def one(z: torch.Tensor) -> torch.Tensor:
        z = z.to(dtype)
        p = torch.softmax(z, dim=-1)
        # a -inf logit (a banned token) has p = 0: its term is 0, not 0 * -inf = NaN
        finite_z = z.masked_fill(torch.isneginf(z), 0.0)
        return torch.logsumexp(z, dim=-1) - (p * finite_z).sum(dim=-1)

    if chunk_size is None:
        return one(logits)
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.cat([one(flat[i:i + chunk_size]) for i in range(0, flat.shape[0], chunk_size)])
    return out.view(logits.shape[:-1])


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float, agg: str = "token_mean",
                  num_items=None, norm_len: int | None = None):
    """The entropy term to ADD to the loss: -coef * aggregate(H_t) (Williams & Peng 1991;
    PPO's c2 S[pi] term, Schulman et al. 2017). Minimising it raises the entropy.

    entropy: (B, T) per-token entropies (:func:`entropy_from_logits`). Returns ``(loss, stats)``
    with ``entropy`` = the token mean of H over valid tokens.
    """
    m = _check_tokens(mask, entropy=entropy)
    loss = -coef * aggregate(entropy, m, agg, num_items=num_items, norm_len=norm_len)
    with torch.no_grad():
        stats = {"entropy": _zero(entropy.detach(), m).sum() / m.sum().clamp_min(1)}
    return loss, stats


# ----------------------------------------------------------------------------- reward scaling
class RunningMoments:
    """Running mean and standard deviation of every value seen (Welford / Chan et al. 1979
    parallel update: exact for any batch sizes, numerically stable).

    ``update(x)`` folds in a batch; ``mean``, ``var`` (unbiased over everything seen) and ``std``
    are floats. ``state_dict()`` / ``load_state_dict()`` keep it across checkpoints. Over
    several processes, gather the batch before ``update`` so every process holds the same
    moments.
    """

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0     # sum of squared deviations from the mean

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else float("nan")

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count > 1 else float("nan")

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Add the elements of ``x``; returns this batch's (mean, unbiased std; NaN for n=1)."""
        x = torch.as_tensor(x).detach().double().flatten()
        n = x.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("RunningMoments.update got non-finite values")
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta ** 2 * self.count * n / total
        self.count = total
        return b_mean, (math.sqrt(b_m2 / (n - 1)) if n > 1 else float("nan"))

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


@torch.no_grad()
def normalise_rewards(rewards: torch.Tensor, moments: RunningMoments, clip: float | None = None,
                      update: bool = True, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale rewards by running statistics (reward normalisation in PPO for LMs, e.g. Ziegler
    et al. 2019; OpenRLHF's and TRL's ``whiten``-ed scores):

        r' = clip( (r - mu) / (sigma + eps), -clip, clip )     (shift_mean=False: r / (sigma + eps))

    ``update=True`` first folds this batch into ``moments`` (so the first batch is normalised by
    its own statistics); mu, sigma are the running mean and unbiased std. Before two values
    have been seen sigma is undefined: then only the mean is removed. ``clip`` None: no clipping.
    """
    if update:
        moments.update(rewards)
    if moments.count == 0:
        raise ValueError("normalise_rewards: the moments have seen no data (update=False on a fresh "
                         "RunningMoments)")
    r = rewards - moments.mean if shift_mean else rewards
    if moments.count > 1:
        r = r / (moments.std + eps)
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        r = r.clamp(-clip, clip)
    return r
