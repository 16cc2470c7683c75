"""What the online-RL methods (GRPO and its estimators in :mod:`.grpo`, PPO in :mod:`.ppo`) share:
the config sections and base config, the clipped policy objective, setup (prompts, policy,
reference, rewards: :func:`run_online`) and the held-out evaluation. The loop itself is the
engine's online step strategy, :class:`vlmalign.engine.online.OnlineTrainer`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import opt, section
from ..config.sections import DataSection, RLOptim, TrainSection
from ..errors import VlmalignError
from ..losses.rl import KL_KINDS, aggregate, kl_penalty, masked_mean, policy_loss_clipped
from ..rewards import RewardInput
from ..rewards.specs import parse_source
from ..rollout import SamplingConfig, rollout, sequence_logprobs
from .reference import PolicyConfig, build_reference, disable_dropout, starting_copy

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- config sections
@dataclass
class RolloutSection:
    prompts_per_step: int = opt(8, "prompts sampled per step and process", ge=1)
    k: int = opt(4, "responses sampled per prompt (the group size)", ge=1)
    temperature: float = opt(1.0, "sampling temperature (log-probs and ratios use the same temperature)", gt=0)
    top_p: float = opt(1.0, "nucleus sampling mass (1: off)", gt=0, le=1)
    top_k: int = opt(0, "sample among the k most likely tokens (0: off)", ge=0)
    max_new_tokens: int = opt(64, "response token budget (responses that reach it count as unfinished)", ge=1)
    generation_batch_size: int | None = opt(None, "prompts per generate call (default: the whole step); "
                                                  "images are still encoded once per step", ge=1)
    prefix_sharing: bool = opt(True, "prefill each prompt (its image tokens included) once and copy its key/value "
                                     "cache to its k samples before sampling; exact, and off by itself where the "
                                     "family or setup does not allow it (as update.prefix_sharing)")


@dataclass
class KLSection:
    coef: float = opt(0.0, "weight of the KL(policy || reference) penalty (0: none)", ge=0)
    estimator: str = opt("k3", "per-token KL estimate: k1 (log-ratio), k2 (squared/2), k3 (low-variance, >= 0)",
                         KL_KINDS)
    placement: str = opt("loss", "loss: add coef * KL to the loss (GRPO); reward: subtract it from the "
                                 "reward before the advantages (PPO, REINFORCE++)", ("loss", "reward"))
    track: bool = opt(True, "compute and log the KL to the reference even when coef is 0 (keeps a reference "
                            "and runs one no-grad reference forward per step)")


@dataclass
class UpdateSection:
    epochs: int = opt(1, "passes over each rollout's rows (PPO epochs)", ge=1)
    minibatch_size: int = opt(0, "rows per optimizer step and process (0: all rows of the step's rollout); "
                                 "train.batch_size is the rows per forward", ge=0)
    clip_eps: float = opt(0.2, "ratio clip: 1 - clip_eps .. 1 + clip_eps_high", gt=0)
    clip_eps_high: float | None = opt(None, "upper ratio clip (DAPO clip-higher; default clip_eps)", gt=0)
    old_logprobs: str = opt("auto", "ratio denominator. auto: with one optimizer step per rollout the policy's own "
                                    "detached log-probs (ratio 1), else a no-grad forward before the updates; "
                                    "recompute: always that forward; sampling: the log-probs recorded while "
                                    "sampling (no forward)", ("auto", "recompute", "sampling"))
    disable_dropout: bool = opt(True, "turn dropout off in policy and reference, so log-probs are not noise")
    prefix_sharing: bool = opt(True, "run each prompt (its image tokens included) once per group in the log-prob "
                                     "forwards (update, old and reference log-probs) and continue its key/value "
                                     "cache for the group's k responses; exact, and off by itself where the family "
                                     "or setup does not allow it (M-RoPE, prefix-LM, activation checkpointing, FSDP2)")


def policy_objective(logprobs, data, mask, *, update: UpdateSection, kl: KLSection, agg: str, num_items,
                     norm_len: int | None = None):
    """The clipped policy-gradient loss plus, with ``kl.placement=loss``, ``kl.coef * KL``
    (losses/rl.py does the arithmetic). ``data``: this micro-batch's ``advantages`` and
    optional ``old_logprobs`` / ``ref_logprobs`` (R, T). Returns ``(loss, stats)``; stat keys
    ending in ``loss`` add up over micro-batches, the others are token means."""
    old = data.get("old_logprobs")
    old = logprobs.detach() if old is None else old
    loss, st = policy_loss_clipped(logprobs, old, data["advantages"], mask, clip_eps=update.clip_eps,
                                   clip_eps_high=update.clip_eps_high, agg=agg, num_items=num_items,
                                   norm_len=norm_len)
    stats = {"policy_loss": loss.detach(), "clipfrac": st["clipfrac"], "approx_kl": st["approx_kl"],
             "ratio_mean": st["ratio_mean"]}
    ref = data.get("ref_logprobs")
    if ref is not None:
        per_token = kl_penalty(logprobs, ref, kl.estimator)
        stats["kl"] = masked_mean(per_token.detach(), mask)
        if kl.coef > 0 and kl.placement == "loss":
            kl_loss = kl.coef * aggregate(per_token, mask, agg, num_items=num_items, norm_len=norm_len)
            loss = loss + kl_loss
            stats["kl_loss"] = kl_loss.detach()
    return loss, stats


@dataclass
class OnlineConfig(PolicyConfig):
    """The sections every online-RL method has; a method adds its own (and may start some at
    other defaults)."""
    data: DataSection = section(DataSection, "RL prompts (train_file, eval_file); max_length bounds prompt + "
                                             "response")
    optim: RLOptim = section(RLOptim, "optimizer and learning-rate schedule (per optimizer step)")
    train: TrainSection = section(TrainSection, "steps (one rollout each), batch_size = rows per forward, "
                                                "precision, checkpoints, eval_every")
    rollout: RolloutSection = section(RolloutSection, "sampling: prompts per step, k, temperature, top_p/top_k, "
                                                      "max_new_tokens")
    reward: list[dict] = opt([{"type": "function", "name": "exact_match", "weight": 1.0}],
                             "reward sources, each {type: function|model|judge, weight, ...}: the options of "
                             "vlmalign.rewards.specs (docs/RL.md)")
    kl: KLSection = section(KLSection, "KL to the reference: coef, estimator, in the loss or the reward")
    update: UpdateSection = section(UpdateSection, "updates per rollout: epochs, minibatch size, ratio clip")

    def check(self) -> None:
        ro, up, tc = self.rollout, self.update, self.train
        if tc.grad_accum != 1:
            raise VlmalignError("train.grad_accum does not apply to online RL: update.minibatch_size sets the rows "
                                "per optimizer step and train.batch_size the rows per forward")
        if up.minibatch_size > ro.prompts_per_step * ro.k:
            raise VlmalignError(f"update.minibatch_size ({up.minibatch_size}) exceeds the rows of a rollout "
                                f"(rollout.prompts_per_step x rollout.k = {ro.prompts_per_step * ro.k})")
        if self.data.max_length <= ro.max_new_tokens:
            raise VlmalignError(f"data.max_length ({self.data.max_length}) must exceed rollout.max_new_tokens "
                                f"({ro.max_new_tokens}): prompts get the difference")
        if not isinstance(self.reward, list) or not self.reward:
            raise VlmalignError("reward: list at least one reward source (docs/RL.md, 'Reward sources')")
        for i, entry in enumerate(self.reward):   # each entry against its declared spec, before anything loads
            parse_source(entry, where=f"reward[{i}]")


# ----------------------------------------------------------------------------- setup
def load_prompts(path: str, cfg, adapter, limit=None):
    """RL prompts of ``path`` and their image loader. Every prompt is tokenized and its images
    loaded once up front, so a bad record stops the run (or is skipped and counted under
    ``data.on_error=skip``) before any step; prompts longer than ``data.max_length -
    rollout.max_new_tokens`` are refused, never cut."""
    from ..data.loading import load_examples
    max_prompt = cfg.data.max_length - cfg.rollout.max_new_tokens

    def tok(rec, imgs):
        return {"input_ids": adapter.tokenize_prompt(rec.prompt, imgs, max_length=max_prompt).input_ids}

    examples, loader, _ = load_examples(path, cfg.data, adapter, tok, kind="rl_prompt", limit=limit)
    return [e.record for e in examples], loader


def run_online(cfg, method, adapter=None, reward=None, callbacks=()):
    """Build policy, reference, data and rewards for ``cfg`` and train with ``method`` on the
    engine's online strategy. ``reward``: a ready :class:`~vlmalign.rewards.CombinedReward` (or
    any callable ``inputs -> (total (N,), {name: (N,)})``, optionally with ``stats()``) instead of
    the recipe's ``reward:`` list. Returns ``(TrainResult, adapter)``."""
    from ..engine.online import OnlineTrainer
    from ..data.loading import load_splits
    from .setup import prepare_trainable, start_run
    adapter = start_run(cfg, adapter, data_needed="data.train_file (RL prompts) is required")
    records, loader, eval_records, eval_loader = load_splits(
        cfg.data, lambda path, limit: load_prompts(path, cfg, adapter, limit))
    needs_ref = cfg.kl.coef > 0 or cfg.kl.track
    copy_ref = starting_copy(adapter, cfg) if needs_ref else None
    model, projector, vision = prepare_trainable(adapter, cfg)
    if cfg.update.disable_dropout:
        disable_dropout(model)
    reference = None
    if needs_ref:
        reference, _ = build_reference(cfg, adapter, model, copy_ref, no_dropout=cfg.update.disable_dropout)
        log.info(reference.describe())
    trainer = OnlineTrainer(cfg=cfg, method=method, adapter=adapter, model=model, records=records, loader=loader,
                            reward=reward, reference=reference, eval_records=eval_records,
                            eval_loader=eval_loader, evaluate=evaluate, projector_names=projector,
                            vision_names=vision, callbacks=callbacks)
    return trainer.train(), adapter


# ----------------------------------------------------------------------------- evaluation
def _kl_rows(tr, mb) -> tuple[float, int] | None:
    """Summed exact KL(policy || reference) over the response tokens of sub-batch ``mb`` and
    their count; one row of full-vocabulary log-probs at a time. None where the output head
    applied to the final hidden state does not reproduce the forward's log-probs (e.g. a family
    that rescales its logits)."""
    ref, mask = tr.reference, mb.response_mask
    lp, h = sequence_logprobs(tr.adapter, mb, encoded=tr.policy_features(mb), temperature=1.0, return_hidden=True)
    with ref.context():
        enc = mb.encoded if (ref.share_features and tr.encoder_frozen) else None
        rlp, rh = sequence_logprobs(ref.adapter, mb, encoded=enc, temperature=1.0, return_hidden=True)
    tol = 1e-3 if h.dtype == torch.float32 else 5e-2
    with tr.head_gathered():     # FSDP2: the output heads' parameters gathered (every process)
        return _kl_sum(tr, ref, mask, mb, lp, h, rlp, rh, tol)


def _kl_sum(tr, ref, mask, mb, lp, h, rlp, rh, tol):
    total = 0.0
    for r in range(mask.shape[0]):
        m, ids = mask[r], mb.response_ids[r][mask[r]]
        logp = torch.log_softmax(tr.head_logits(tr.adapter, h[r, m]), dim=-1)        # (n, V)
        logq = torch.log_softmax(tr.head_logits(ref.adapter, rh[r, m]), dim=-1)
        for full, want in ((logp, lp[r, m]), (logq, rlp[r, m])):
            if (full.gather(-1, ids[:, None]).squeeze(-1) - want).abs().max().item() > tol:
                log.warning("%s: the output head on the final hidden state does not reproduce the model's "
                            "log-probs; eval/kl is not reported", tr.adapter.family)
                return None
        total += float(torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="sum"))
    return total, int(mask.sum())


def evaluate(tr, step: int) -> dict:
    """Greedy responses to the held-out prompts (main process): mean reward (total and per
    source), response length, share finished, and the exact per-token KL(policy || reference)
    along those responses, ``sum_v p(v) (log p(v) - log q(v))`` averaged over response tokens
    (the distance this stage has moved from its reference)."""
    out = {}
    if getattr(tr, "sharded", False):
        # FSDP2: every process must run each forward; each runs the whole evaluation (the same
        # prompts, greedy) and the main process's numbers are kept
        out = _evaluate(tr)
        return out if tr.acc.is_main_process else {}
    if tr.acc.is_main_process:
        out = _evaluate(tr)
    tr.acc.wait_for_everyone()
    return out


def _evaluate(tr) -> dict:
    cfg, ad, ref = tr.cfg, tr.adapter, tr.reference
    greedy = SamplingConfig(max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0)
    chunk = cfg.rollout.generation_batch_size or cfg.rollout.prompts_per_step * cfg.rollout.k
    sums: dict[str, float] = {}
    kl_ok = ref is not None
    n = 0
    with tr.no_grad_pass():
        for s in range(0, len(tr.eval_records), chunk):
            b = rollout(ad, tr.eval_records[s:s + chunk], tr.eval_loader, greedy, 1, seed=0,
                        max_prompt_length=tr.max_prompt_length, synced=getattr(tr, "sharded", False))
            lengths, fin = b.response_lengths.tolist(), b.finished.tolist()
            inputs = [RewardInput.from_record(b.records[g], t, finished=bool(f), response_tokens=int(m))
                      for g, t, f, m in zip(b.group_ids.tolist(), b.texts, fin, lengths)]
            total, parts = tr.eval_reward(inputs)
            n += len(inputs)
            for key, v in (("reward", total.sum()), ("response_length", sum(lengths)), ("finished", sum(fin)),
                           *((f"reward/{p}", v.sum()) for p, v in parts.items())):
                sums[key] = sums.get(key, 0.0) + float(v)
            bs = cfg.train.batch_size
            for r0 in range(0, b.num_rows, bs) if kl_ok else ():
                got = _kl_rows(tr, b.select(range(r0, min(b.num_rows, r0 + bs))))
                if got is None:
                    kl_ok = False
                    break
                sums["kl"] = sums.get("kl", 0.0) + got[0]
                sums["_tokens"] = sums.get("_tokens", 0.0) + got[1]
    tokens = sums.pop("_tokens", 0.0)
    out = {k: v / max(n, 1) for k, v in sums.items() if k != "kl"}
    if kl_ok and tokens:
        out["kl"] = sums["kl"] / tokens
    return out
