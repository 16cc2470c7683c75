"""Preference-optimisation losses over completion log-probabilities (the DPO family).

Inputs are SUMMED log-probs of each completion, shape (B,), unless a function says otherwise
(SimPO and ORPO take length-averaged ones). Every loss returns ``(losses, stats)``: ``losses`` is
per example, shape (B,), NOT reduced (callers sum and divide by a count taken over all
micro-batches and processes); ``stats`` maps names to detached per-example (B,) float tensors.
Computation stays in the input dtype; inputs are never modified.
"""

from __future__ import annotations

import difflib
import math

import torch
import torch.nn.functional as F

from vlmalign.losses.reward import plackett_luce_loss

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "cdpo", "simpo", "orpo")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")


def _check_vectors(**tensors: torch.Tensor) -> None:
    """Every argument must be a (B,) tensor, all of the same B."""
    shape = None
    for name, x in tensors.items():
        if not torch.is_tensor(x) or x.dim() != 1:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be a (B,) tensor of per-completion log-probs, got {got}")
        if shape is None:
            shape = x.shape
        elif x.shape != shape:
            names = ", ".join(tensors)
            raise ValueError(f"{names} must all have the same shape; {name} is {tuple(x.shape)}, "
                             f"expected {tuple(shape)}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _pair_stats(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> dict:
    c, r = chosen_reward.detach(), rejected_reward.detach()
    return {"chosen_reward": c, "rejected_reward": r, "margin": c - r,
            "accuracy": (c > r).to(c.dtype)}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """DPO and its pairwise variants over policy/reference log-probs.

    With h = (pc - rc) - (pr - rr) (chosen minus rejected log-ratio) and z = beta * h:

    * ``"sigmoid"``: -(1 - eps) log sig(z) - eps log sig(-z). eps = ``label_smoothing`` = 0 is
      DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly
      a Reward Model"); eps > 0 is conservative DPO (cDPO, Mitchell 2023), which assumes each
      label is flipped with probability eps.
    * ``"ipo"``: (h - 1 / (2 beta))^2 (IPO, Azar et al. 2023, "A General Theoretical Paradigm to
      Understand Learning from Human Preferences"). The function uses the log-probs it is given:
      pass length-AVERAGED log-probs for IPO's per-token form, summed ones for the sequence
      form (the caller decides; nothing is averaged here).
    * ``"hinge"``: relu(1 - z) (SLiC-HF, Zhao et al. 2023; RSO, Liu et al. 2024).

    policy_* / ref_*: (B,) summed log-probs of the chosen / rejected completion.
    Stats: chosen_reward = beta (pc - rc), rejected_reward = beta (pr - rr), margin = their
    difference, accuracy = 1.0 where chosen_reward > rejected_reward.
    """
    _check_vectors(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                   ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    _check_positive("beta", beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies only to loss_type='sigmoid', not {loss_type!r}")
    chosen_ratio = policy_chosen - ref_chosen        # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    h = chosen_ratio - rejected_ratio
    z = beta * h
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(z)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - z)
    return losses, _pair_stats(beta * chosen_ratio, beta * rejected_ratio)


def simpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor,
               beta: float = 2.0, gamma: float = 0.5):
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward"):

        L = -log sig(beta * avg_c - beta * avg_r - gamma)

    Reference-free. policy_*_avg: (B,) LENGTH-AVERAGED log-probs (sum / number of completion
    tokens). gamma is the target reward margin. Stats: chosen_reward = beta avg_c,
    rejected_reward = beta avg_r, margin, accuracy.
    """
    _check_vectors(policy_chosen_avg=policy_chosen_avg, policy_rejected_avg=policy_rejected_avg)
    _check_positive("beta", beta)
    chosen_reward = beta * policy_chosen_avg
    rejected_reward = beta * policy_rejected_avg
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return losses, _pair_stats(chosen_reward, rejected_reward)


# A probability of exactly 1 has infinite odds: averaged log-probs are clamped to at most this.
_ORPO_MAX_AVG_LOGP = -1e-6


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate over the whole range (Maechler 2012): log(-expm1(x))
    near 0, log1p(-exp(x)) below -log 2. Each branch sees a clamped input so the unused branch
    never makes a non-finite gradient."""
    ln2 = math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=-ln2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-ln2)))
    return torch.where(x > -ln2, near_zero, far)


def orpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor,
              chosen_nll: torch.Tensor, lam: float = 0.1):
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model"):

        log odds(y) = avg - log(1 - exp(avg))
        L_OR = -log sig(log odds(y_c) - log odds(y_r))
        L    = chosen_nll + lam * L_OR

    policy_*_avg: (B,) LENGTH-AVERAGED log-probs (< 0; values above -1e-6 are clamped there,
    since a probability of 1 has infinite odds, and get no gradient). chosen_nll: (B,) the SFT
    term for the chosen completion as the caller normalises it (the paper uses the token-mean
    NLL, i.e. -policy_chosen_avg). Stats: or_loss (L_OR), nll, log_odds_ratio,
    chosen_reward / rejected_reward (the averaged log-probs), margin, accuracy (log odds ratio > 0).
    """
    _check_vectors(policy_chosen_avg=policy_chosen_avg, policy_rejected_avg=policy_rejected_avg,
                   chosen_nll=chosen_nll)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    c = policy_chosen_avg.clamp(max=_ORPO_MAX_AVG_LOGP)
    r = policy_rejected_avg.clamp(max=_ORPO_MAX_AVG_LOGP)
    log_odds_ratio = (c - _log1mexp(c)) - (r - _log1mexp(r))    # (B,)
    or_loss = -F.logsigmoid(log_odds_ratio)
    losses = chosen_nll + lam * or_loss
    stats = _pair_stats(policy_chosen_avg, policy_rejected_avg)
    lor = log_odds_ratio.detach()
    stats.update(accuracy=(lor > 0).to(lor.dtype), log_odds_ratio=lor, or_loss=or_loss.detach(),
                 nll=chosen_nll.detach())
    return losses, stats


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor | float, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"),
    for unpaired examples. With r = policy - ref and z0 = max(kl, 0) (a constant: detached):

        desirable:    L = w_d * (1 - sig(beta * (r - z0)))
        undesirable:  L = w_u * (1 - sig(beta * (z0 - r)))

    policy_logps, ref_logps: (B,) summed log-probs of each completion. desirable: (B,) bool.
    kl: the batch's KL estimate (a scalar tensor or float; the paper uses mismatched
    prompt/completion pairs). Stats: reward = beta r, desirable / undesirable as 0/1.
    """
    _check_vectors(policy_logps=policy_logps, ref_logps=ref_logps)
    _check_positive("beta", beta)
    if not torch.is_tensor(desirable) or desirable.dtype != torch.bool \
            or desirable.shape != policy_logps.shape:
        got = (tuple(desirable.shape), desirable.dtype) if torch.is_tensor(desirable) \
            else type(desirable).__name__
        raise ValueError(f"desirable must be a bool tensor of shape {tuple(policy_logps.shape)}, "
                         f"got {got}")
    kl = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device)
    if kl.numel() != 1:
        raise ValueError(f"kl must be a scalar (the batch KL estimate), got shape {tuple(kl.shape)}")
    z0 = kl.detach().reshape(()).clamp(min=0)
    r = policy_logps - ref_logps                                   # (B,)
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(desirable, good, bad)
    reward = (beta * r).detach()
    return losses, {"reward": reward, "desirable": desirable.to(reward.dtype),
                    "undesirable": (~desirable).to(reward.dtype)}


def listwise_dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor,
                      mask: torch.Tensor | None = None, beta: float = 0.1):
    """DPO over ranked lists: the Plackett-Luce model on the implicit rewards
    r_k = beta * (policy_k - ref_k) (Rafailov et al. 2023, appendix A.3; LiPO, Liu et al. 2024):

        L = -sum_{k valid} [ r_k - logsumexp_{j >= k, j valid} r_j ]

    policy_logps, ref_logps: (B, K) summed log-probs, candidates ordered best first. mask: (B, K)
    bool valid prefix (lists of unequal length), as for ``plackett_luce_loss``. With K = 2 this
    is DPO's sigmoid loss. Stats as ``plackett_luce_loss`` on the rewards (accuracy, margin, top1,
    chosen_reward = reward of the best candidate, num_candidates).
    """
    for name, x in (("policy_logps", policy_logps), ("ref_logps", ref_logps)):
        if not torch.is_tensor(x) or x.dim() != 2:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be a (B, K) tensor ordered best first, got {got}")
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(f"policy_logps {tuple(policy_logps.shape)} and ref_logps "
                         f"{tuple(ref_logps.shape)} must have the same shape")
    _check_positive("beta", beta)
    return plackett_luce_loss(beta * (policy_logps - ref_logps), mask)


def token_weighted_logps(token_logps: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
                         normalize: bool = True) -> torch.Tensor:
    """Weighted completion log-prob of RLHF-V's dense DPO (DDPO; Yu et al. 2024, "RLHF-V:
    Towards Trustworthy MLLMs via Behavior Alignment from Fine-grained Correctional Human
    Feedback", the DDPO objective):

        log p(y|x) = (1/N) [ sum_{unchanged t} lp_t + gamma * sum_{changed t} lp_t ],
        N = #unchanged + gamma * #changed

    i.e. with per-token weights w (1 unchanged, gamma changed; see ``changed_token_weights``):
    sum_t(w_t lp_t m_t) / sum_t(w_t m_t), the paper's normalisation exactly. ``normalize=False``
    returns the weighted sum sum_t(w_t lp_t m_t) without dividing by N (what RLHF-V's public
    code uses when it does not average).

    token_logps, weights: (B, T); mask: (B, T) bool, True on completion tokens (masked-out
    positions may hold any value). Returns a (B,) tensor in token_logps's dtype. A row with no
    masked-in weight (N <= 0) raises ValueError.
    """
    if not torch.is_tensor(token_logps) or token_logps.dim() != 2:
        got = tuple(token_logps.shape) if torch.is_tensor(token_logps) else type(token_logps).__name__
        raise ValueError(f"token_logps must be a (B, T) tensor, got {got}")
    shape = tuple(token_logps.shape)
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        got = (tuple(mask.shape), mask.dtype) if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape {shape}, got {got}")
    if not torch.is_tensor(weights) or tuple(weights.shape) != shape:
        got = tuple(weights.shape) if torch.is_tensor(weights) else type(weights).__name__
        raise ValueError(f"weights must be a tensor of shape {shape}, got {got}")
    zero = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    # where, not multiply: a masked-out -inf or nan must not leak into the sums or gradients
    lp = torch.where(mask, token_logps, zero)                              # (B, T)
    w = torch.where(mask, weights.to(token_logps.dtype), zero)             # (B, T)
    weighted = (w * lp).sum(dim=1)                                         # (B,)
    if not normalize:
        return weighted
    n = w.sum(dim=1)
    bad = (n <= 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"token_weighted_logps: rows {bad} have no completion tokens with positive "
                         "weight (sum of weights over the mask <= 0)")
    return weighted / n


def changed_token_weights(chosen_ids: torch.Tensor, rejected_ids: torch.Tensor,
                          chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
                          gamma: float = 5.0, dtype: torch.dtype = torch.float32):
    """Per-token weights for RLHF-V's dense DPO: ``gamma`` on the tokens of the segments where
    chosen and rejected differ, 1 elsewhere (RLHF-V uses gamma = 5).

    Per row, the completion tokens (where the mask is True, in order) of the two responses are
    aligned with ``difflib.SequenceMatcher(autojunk=False)`` (deterministic; recursive longest
    matching blocks, close to a longest common subsequence). Tokens inside matching blocks are
    unchanged (weight 1); every other completion token is changed (weight gamma). Positions
    outside the masks get 1 (they are masked out downstream anyway).

    chosen_ids, chosen_mask: (B, Tc); rejected_ids, rejected_mask: (B, Tr). Returns
    ``(chosen_weights (B, Tc), rejected_weights (B, Tr))`` in ``dtype`` on the ids' device.
    """
    for name, ids, m in (("chosen", chosen_ids, chosen_mask), ("rejected", rejected_ids, rejected_mask)):
        if not torch.is_tensor(ids) or ids.dim() != 2:
            got = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
            raise ValueError(f"{name}_ids must be a (B, T) tensor of token ids, got {got}")
        if not torch.is_tensor(m) or m.dtype != torch.bool or m.shape != ids.shape:
            got = (tuple(m.shape), m.dtype) if torch.is_tensor(m) else type(m).__name__
            raise ValueError(f"{name}_mask must be a bool tensor of shape {tuple(ids.shape)}, got {got}")
    if chosen_ids.shape[0] != rejected_ids.shape[0]:
        raise ValueError(f"chosen_ids has {chosen_ids.shape[0]} rows, rejected_ids "
                         f"{rejected_ids.shape[0]}: they must be paired row by row")
    wc = [[1.0] * chosen_ids.shape[1] for _ in range(chosen_ids.shape[0])]
    wr = [[1.0] * rejected_ids.shape[1] for _ in range(rejected_ids.shape[0])]
    c_ids, r_ids = chosen_ids.tolist(), rejected_ids.tolist()
    c_mask, r_mask = chosen_mask.tolist(), rejected_mask.tolist()
    for b in range(len(c_ids)):
        c_pos = [t for t, keep in enumerate(c_mask[b]) if keep]
        r_pos = [t for t, keep in enumerate(r_mask[b]) if keep]
        c_tok = [c_ids[b][t] for t in c_pos]
        r_tok = [r_ids[b][t] for t in r_pos]
        c_changed, r_changed = [True] * len(c_tok), [True] * len(r_tok)
        matcher = difflib.SequenceMatcher(None, c_tok, r_tok, autojunk=False)
        for i, j, size in matcher.get_matching_blocks():
            c_changed[i:i + size] = [False] * size
            r_changed[j:j + size] = [False] * size
        for pos, changed in zip(c_pos, c_changed):
            wc[b][pos] = gamma if changed else 1.0
        for pos, changed in zip(r_pos, r_changed):
            wr[b][pos] = gamma if changed else 1.0
    return (torch.tensor(wc, dtype=dtype, device=chosen_ids.device).reshape(chosen_ids.shape),
            torch.tensor(wr, dtype=dtype, device=rejected_ids.device).reshape(rejected_ids.shape))


def mdpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
              ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
              policy_chosen_corrupt: torch.Tensor, ref_chosen_corrupt: torch.Tensor,
              beta: float = 0.1, anchor: float = 0.0, cond_weight: float = 1.0,
              anchor_weight: float = 1.0):
    """mDPO (Wang et al. 2024, "mDPO: Conditional Preference Optimization for Multimodal Large
    Language Models"). With c = pc - rc, r = pr - rr and cc = pcc - rcc (the chosen response's
    log-ratio given a corrupted image):

        L_DPO    = -log sig(beta * (c - r))                  standard DPO
        L_CoPO   = -log sig(beta * (c - cc))                 prefer the real image (conditional)
        L_AncPO  = -log sig(beta * c - anchor)               keep the chosen reward above anchor
        L = L_DPO + cond_weight * L_CoPO + anchor_weight * L_AncPO

    All inputs: (B,) summed log-probs. Stats: dpo_loss, cond_loss, anchor_loss, chosen_reward
    (beta c), rejected_reward (beta r), corrupt_reward (beta cc), margin, accuracy,
    cond_margin (beta (c - cc)), cond_accuracy.
    """
    _check_vectors(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                   ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                   policy_chosen_corrupt=policy_chosen_corrupt, ref_chosen_corrupt=ref_chosen_corrupt)
    _check_positive("beta", beta)
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    corrupt_reward = beta * (policy_chosen_corrupt - ref_chosen_corrupt)
    dpo = -F.logsigmoid(chosen_reward - rejected_reward)
    cond = -F.logsigmoid(chosen_reward - corrupt_reward)
    anc = -F.logsigmoid(chosen_reward - anchor)
    losses = dpo + cond_weight * cond + anchor_weight * anc
    stats = _pair_stats(chosen_reward, rejected_reward)
    cm = (chosen_reward - corrupt_reward).detach()
    stats.update(dpo_loss=dpo.detach(), cond_loss=cond.detach(), anchor_loss=anc.detach(),
                 corrupt_reward=corrupt_reward.detach(), cond_margin=cm,
                 cond_accuracy=(cm > 0).to(cm.dtype))
    return losses, stats


def with_chosen_nll(losses: torch.Tensor, stats: dict, chosen_nll: torch.Tensor, alpha: float):
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; the NLL term of the
    Llama 3 report's DPO): a preference loss plus the chosen completion's negative log-likelihood,

        L = L_pref + alpha * chosen_nll

    ``losses``: (B,) the preference loss per pair; ``chosen_nll``: (B,) the chosen completion's NLL
    as the caller normalises it (per token: minus the length-averaged log-prob). Returns
    ``(losses, stats)`` with ``stats["nll"]`` added; ``alpha`` 0 returns ``losses`` unchanged.
    """
    _check_vectors(losses=losses, chosen_nll=chosen_nll)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    stats = {**stats, "nll": chosen_nll.detach()}
    return (losses + alpha * chosen_nll if alpha else losses), stats


def preference_loss(name: str, **kw):
    """Dispatch a recipe's ``loss`` name to its function and call it with ``kw``:

    * ``"sigmoid"``, ``"ipo"``, ``"hinge"``: ``dpo_loss(loss_type=name, **kw)`` (kw: policy_chosen,
      policy_rejected, ref_chosen, ref_rejected, beta, and label_smoothing for sigmoid);
    * ``"cdpo"``: ``dpo_loss(loss_type="sigmoid", **kw)``, which needs label_smoothing > 0;
    * ``"simpo"``: ``simpo_loss(**kw)`` (policy_chosen_avg, policy_rejected_avg, beta, gamma);
    * ``"orpo"``: ``orpo_loss(**kw)`` (policy_chosen_avg, policy_rejected_avg, chosen_nll, lam).

    Names in ``REFERENCE_FREE_LOSSES`` need no reference model. Returns ``(losses, stats)``.
    """
    if name in DPO_LOSS_TYPES or name == "cdpo":
        if "loss_type" in kw:
            raise ValueError(f"preference_loss({name!r}): the name selects the loss type; "
                             "do not pass loss_type")
        if name == "cdpo" and not kw.get("label_smoothing"):
            raise ValueError("loss 'cdpo' needs label_smoothing in (0, 0.5] "
                             "(with 0 it is plain 'sigmoid')")
        return dpo_loss(loss_type="sigmoid" if name == "cdpo" else name, **kw)
    if name == "simpo":
        return simpo_loss(**kw)
    if name == "orpo":
        return orpo_loss(**kw)
    raise ValueError(f"unknown preference loss {name!r}; valid: {', '.join(PREFERENCE_LOSSES)}")
