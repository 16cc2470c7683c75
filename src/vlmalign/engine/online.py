"""The online-RL step strategy of the engine: GRPO, RLOO, REINFORCE++ (methods/grpo.py) and PPO.

One step, per process (docs/RL.md, "GRPO / RLOO"):

1. ``rollout.prompts_per_step`` prompts (a seeded permutation of the prompt file per epoch) ->
   :func:`~vlmalign.rollout.rollout`: ``rollout.k`` samples each, every unique image encoded ONCE;
   each row samples from its own generator, seeded by (train.seed, step, the prompt's place in
   the step, the sample's index), so a resumed run samples the same tokens and a prompt's
   samples do not depend on which process draws them (two processes equal one:
   tests/integration/test_rl_processes.py). A prompt's k samples stay on one process; the
   batch-wide advantage statistics sum over processes (``process_sum``).
2. Rewards: the recipe's sources (``reward:``, :func:`~vlmalign.rewards.build_reward`) on
   every response.
3. No-grad forwards: the reference's log-probs (KL) and, where the updates leave the rollout
   policy behind, the rollout policy's own ("old", for the ratio); both on the sampling-time
   image features when the vision tower and projector are frozen.
4. ``method.advantages(loop, batch, data)`` fills ``data["advantages"]`` (R, T): the method's hook
   (group baselines here, GAE with a critic for PPO).
5. ``update.epochs`` passes over the R rows in shuffled minibatches of ``update.minibatch_size``
   rows, one optimizer step each, accumulated over micro-batches of ``train.batch_size`` rows.
   ``method.loss(loop, mb, data, logprobs, hidden, num_items)`` returns each micro-batch's loss
   divided by the minibatch's item count summed over micro-batches and processes (tokens for
   ``token_mean``, rows otherwise), so accumulation and processes give the one-batch gradient.
6. Metrics -> metrics.jsonl and training.png; atomic checkpoints (weights, optimizer, schedule,
   RNG, step, ``method.state_dict()``); greedy held-out evaluation every ``train.eval_every``
   steps, at step 0 and at the end.

Setup, optimizer, checkpoints, resume, the step loop, evaluation and logging are the engine's
(:class:`~.trainer.Engine`); config sections, the shared policy objective, setup
(``run_online``) and the held-out evaluation are :mod:`vlmalign.methods.online`.

A method object provides ``agg`` (the loss aggregation, for item counts), ``advantages`` and
``loss``, and may provide:

* ``rollout_extras(loop, batch) -> dict`` of per-row tensors computed without grad after the
  rollout (e.g. values);
* ``extra_modules() -> dict`` of modules moved to the device and checkpointed next to the policy
  (``NAME.safetensors``, reloaded on resume), e.g. a value model; under FSDP2 a method with
  extra modules must provide ``shard_modules(shard)``: it shards the modules it trains with
  ``shard(root, units)`` (the engine's, the policy's mesh) and rebuilds its optimizer and extra
  modules on the sharded parameters;
* ``optimizer_groups() -> list`` of parameter groups added to the policy's optimizer (their own
  ``lr`` allowed), or ``optimizer_step(loop)`` called after each policy optimizer step (a method
  with its own optimizer: it clips, steps and zeroes it there);
* ``update_policy(loop) -> bool``: False skips the policy's optimizer step (e.g. critic warm-up);
* ``state_dict()`` / ``load_state_dict()``: extra state for checkpoints (e.g. running statistics).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from ..data.loading import data_root
from ..errors import VlmalignError
from ..losses.rl import entropy_from_logits
from ..models.loading import resolve_dtype
from ..rewards import RewardInput, build_reward
from ..rollout import SamplingConfig, rollout, sequence_logprobs
from .sharding import average_replicated_grads, root_gathered
from .trainer import Engine

log = logging.getLogger(__name__)


def _rows(data: dict, rows: list[int], T: int) -> dict:
    """Per-row tensors of ``rows``: (R,) -> (n,), (R, T0) -> (n, T) (a sub-batch drops padding)."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    out = {}
    for k, v in data.items():
        v = v[idx.to(v.device)]
        out[k] = v[:, :T] if v.dim() == 2 else v
    return out


class OnlineTrainer(Engine):
    """Runs ``method`` on ``records`` (RL prompts): see the module docstring for one step."""

    desc = "rl"
    # FSDP2 (train.sharding=fsdp2): every process runs the same forwards. Each samples the same
    # number of prompts (whole steps), generation is synced (a process whose rows have stopped
    # runs forwards until every process's have: HF's synced_gpus), the no-grad forwards and the
    # updates go over the same number of rows, the output head's parameters are gathered for
    # the entropy, and the held-out evaluation runs on every process. PPO's critic, trained
    # beside the policy, is sharded too (its own root on the policy's mesh: method.shard_modules),
    # and its forwards run on every process alike (values at rollout time, one per micro-batch).

    def __init__(self, *, cfg, method, adapter, model, records, loader, reward=None, reference=None,
                 eval_records=(), eval_loader=None, evaluate=None, projector_names=frozenset(),
                 vision_names=frozenset(), callbacks=()):
        """``reward``: a callable ``inputs -> (total (N,), {name: (N,)})`` for training and held-out
        prompts (default: the recipe's ``reward:`` sources, built on the training device);
        ``evaluate(trainer, step) -> dict``: the held-out evaluation, run when there are
        ``eval_records``."""
        self.cfg, self.adapter, self.reference = cfg, adapter, reference
        self.records, self.loader = list(records), loader
        self.eval_records, self.eval_loader = list(eval_records), eval_loader
        ro = cfg.rollout
        self.rows = ro.prompts_per_step * ro.k
        self.minibatch = cfg.update.minibatch_size or self.rows
        extra = method.extra_modules() if hasattr(method, "extra_modules") else {}
        groups = list(method.optimizer_groups()) if hasattr(method, "optimizer_groups") else []
        super().__init__(method=method, model=model, processor=adapter.processor, train_cfg=cfg.train,
                         optim_cfg=cfg.optim, config=cfg, n_items=len(self.records), per_step=ro.prompts_per_step,
                         updates_per_step=cfg.update.epochs * math.ceil(self.rows / self.minibatch),
                         extra_groups=groups, extra_modules=extra, adapters=[adapter], projector_names=projector_names,
                         vision_names=vision_names, records=self.records,
                         evaluate=(lambda step: evaluate(self, step)) if (evaluate and self.eval_records) else None,
                         callbacks=callbacks, empty_message=f"{cfg.data.train_file}: no RL prompts to train on")
        self.sampling = SamplingConfig(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                                       top_p=ro.top_p, top_k=ro.top_k)
        self.max_prompt_length = cfg.data.max_length - ro.max_new_tokens
        single = cfg.update.epochs == 1 and self.minibatch >= self.rows
        self.old_mode = {"auto": "live" if single else "recompute"}.get(cfg.update.old_logprobs,
                                                                           cfg.update.old_logprobs)
        self.encoder_frozen = not (cfg.model.train_vision or cfg.model.train_projector or
                                   (cfg.lora.enabled and cfg.lora.include_vision))
        self.share_prefix = self._can_share_prefix(adapter, "policy")
        self.share_prefill = self._can_share_prefix(adapter, "rollout", "rollout")
        self.ref_share_prefix = reference is not None and (
            self.share_prefix if reference.adapter is adapter else self._can_share_prefix(reference.adapter, "reference"))
        if not self.sharded:   # sharded: FSDP2 put them on the device
            for mod in extra.values():
                mod.to(self.acc.device)
        if reference is not None and reference.adapter is not adapter:
            reference.adapter.model.to(self.acc.device)
        root = data_root(cfg.data, cfg.data.train_file)
        kw = dict(device=self.acc.device, dtype=resolve_dtype(cfg.model.dtype))
        self.reward = reward if reward is not None else build_reward(cfg.reward, image_root=root, **kw)
        eroot = data_root(cfg.data, cfg.data.eval_file) if cfg.data.eval_file else root
        self.eval_reward = self.reward if (reward is not None or eroot == root) else \
            build_reward(cfg.reward, image_root=eroot, **kw)

    # ------------------------------------------------------------------ helpers
    def _can_share_prefix(self, adapter, who: str, section: str = "update") -> bool:
        """Whether ``update.prefix_sharing`` runs each group's prompt once in ``adapter``'s
        log-prob forwards, or (``section="rollout"``) ``rollout.prefix_sharing`` prefills each
        prompt once for its k samples (the reason it does not is logged once)."""
        if not getattr(self.cfg, section).prefix_sharing:
            return False
        why = adapter.prefix_sharing_problem()
        if why is None and section == "rollout" and not adapter.prefill_sharing:
            why = f"{adapter.family}'s generate cannot continue a prefilled cache"
        if why is None and self.sharded:
            why = ("the model is sharded with FSDP2 (generation is synced across processes)" if section == "rollout"
                   else "the model is sharded with FSDP2 (gradients through the key/value cache pass FSDP's "
                        "backward hooks)")
        if why is not None:
            log.warning("%s.prefix_sharing: the %s's forwards run whole rows: %s", section, who, why)
        return why is None

    def _prompts(self, step: int) -> tuple[list, list[int]]:
        """This process's prompts of ``step`` and their places in the step's global list (the
        step's ``prompts_per_step * processes`` prompts, dealt out round-robin: prompt ``i`` of
        process ``r`` is place ``i * processes + r``; every prompt's k samples stay on one process)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        order = self._order(epoch, len(self.records))
        per = self.cfg.rollout.prompts_per_step * self.world
        places = list(range(per))[self.rank::self.world]
        chunk = order[j * per:(j + 1) * per]
        places = [p for p in places if p < len(chunk)]
        return [self.records[chunk[p]] for p in places], places

    def seed_for(self, step: int, salt: int = 0) -> int:
        return ((self.cfg.train.seed * 1_000_003 + step) * 1_009 + self.rank) * 7 + salt

    def row_seeds(self, step: int, places: list[int]) -> list[int]:
        """One sampling seed per row: a function of (train.seed, step, the prompt's place in the
        step, the sample's index), not of the process, so a prompt's k samples are the same
        tokens whichever process draws them and however many processes there are."""
        k = self.cfg.rollout.k
        base = (self.cfg.train.seed * 1_000_003 + step) * 1_000_033
        return [((base + p) * 1_009 + s) * 7 + 3 for p in places for s in range(k)]

    @property
    def process_sum(self):
        """A function summing a tensor over processes (the all-reduce every process must join), or
        None in one process: for advantage statistics that span the whole step's batch (PPO's
        whitening, REINFORCE++'s global normalisation)."""
        return self._reduce if self.world > 1 else None

    def average_gradients(self, params) -> None:
        """Average the gradients of ``params`` over processes, as DDP does for the policy: for a
        module trained beside the policy with its own optimizer (PPO's critic). Its losses went
        through :meth:`backward` (scaled by the process count), so the average is the sum of
        every process's share of the one-process gradient. Every process must call it. Under
        FSDP2 (``sharded``) the module is sharded too, and its backward has already reduced its
        gradients over processes (averaged, like the policy's), except those of the parameters
        sharding kept whole (:func:`~vlmalign.engine.sharding.average_replicated_grads`)."""
        if self.world == 1:
            return
        if self.sharded:
            average_replicated_grads(params)
            return
        import torch.distributed as dist
        grads = [p.grad for p in params if p.grad is not None]
        flags = torch.tensor([float(len(grads))], device=self.acc.device)
        if self._reduce(flags).item() != len(grads) * self.world:
            raise VlmalignError("the processes hold gradients for different critic parameters; cannot average")
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        off = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[off:off + n].view_as(g).to(g.dtype))
            off += n

    def policy_features(self, mb):
        """Image features for a forward of sub-batch ``mb``: the sampling-time ones when the
        encoder is frozen (no re-encoding), else None (encode with the current weights)."""
        return mb.encoded if self.encoder_frozen else None

    def chunked(self, fn, batch) -> torch.Tensor:
        """(R, T) values of ``fn(sub_batch)`` computed ``train.batch_size`` rows at a time."""
        R, T = batch.response_ids.shape
        out = torch.zeros(R, T, dtype=torch.float32, device=batch.response_ids.device)
        bs = self.cfg.train.batch_size
        for s in range(0, R, bs):
            mb = batch.select(range(s, min(R, s + bs)))
            v = fn(mb).float()
            out[s:s + v.shape[0], :v.shape[1]] = v
        return out

    def reference_logprobs(self, mb, policy_encoded=None):
        ref = self.reference
        with ref.context():
            enc = policy_encoded if (ref.share_features and policy_encoded is not None) else None
            return sequence_logprobs(ref.adapter, mb, encoded=enc, share_prefix=self.ref_share_prefix)

    def head_gathered(self):
        """A context in which the output head can be called outside the model's forward: under
        FSDP2 the root unit's parameters (head, embeddings, final norm) are gathered, then
        resharded (every process must enter it); otherwise nothing."""
        import contextlib
        return root_gathered(self.runner) if self.sharded else contextlib.nullcontext()

    @staticmethod
    def head_logits(adapter, hidden, temperature: float = 1.0) -> torch.Tensor:
        """Full-vocabulary fp32 logits (..., V) from final hidden states (the output head's input;
        under mixed precision they may be in a lower dtype than the head's weights)."""
        head = adapter.model.get_output_embeddings()
        return head(hidden.to(head.weight.dtype)).float() / temperature

    @classmethod
    @torch.no_grad()
    def entropy(cls, adapter, hidden, mask, temperature: float) -> torch.Tensor:
        """Mean entropy over the valid tokens of (R, T, H) hidden states, one row of logits at a
        time (full-vocabulary logits of a whole batch can be large)."""
        total = sum(entropy_from_logits(cls.head_logits(adapter, hidden[r, mask[r]], temperature)).sum()
                    for r in range(hidden.shape[0]))
        return total / mask.sum().clamp_min(1)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, ad, method = self.cfg, self.adapter, self.method
        self._grad_norm = None
        t0 = time.time()
        prompts, places = self._prompts(self.step)
        batch = rollout(ad, prompts, self.loader, self.sampling, cfg.rollout.k,
                        seed=self.seed_for(self.step), batch_size=cfg.rollout.generation_batch_size,
                        max_prompt_length=self.max_prompt_length, row_seeds=self.row_seeds(self.step, places),
                        synced=self.sharded, share_prefill=self.share_prefill)
        t_roll = time.time() - t0
        lengths, fin = batch.response_lengths.tolist(), batch.finished.tolist()
        inputs = [RewardInput.from_record(batch.records[g], text, finished=bool(f), response_tokens=int(n))
                  for g, text, f, n in zip(batch.group_ids.tolist(), batch.texts, fin, lengths)]
        scores, parts = self.reward(inputs)
        dev = batch.response_ids.device
        data = {"scores": scores.to(dev)}
        with self.no_grad_pass():
            if self.old_mode == "recompute":
                data["old_logprobs"] = self.chunked(
                    lambda mb: sequence_logprobs(ad, mb, encoded=self.policy_features(mb),
                                                 share_prefix=self.share_prefix), batch)
            elif self.old_mode == "sampling":
                data["old_logprobs"] = batch.logprobs
            if self.reference is not None:
                data["ref_logprobs"] = self.chunked(
                    lambda mb: self.reference_logprobs(mb, self.policy_features(mb)), batch)
            if hasattr(method, "rollout_extras"):
                data.update(method.rollout_extras(self, batch))
        adv_stats = method.advantages(self, batch, data) or {}
        t1 = time.time()
        upd = self._update(batch, data)
        # rollout statistics over every process's rows
        k = cfg.rollout.k
        grp = scores.view(-1, k)
        sums = {"n": scores.numel(), "r": scores.sum(), "r2": (scores.double() ** 2).sum(),
                "len": sum(lengths), "fin": sum(fin), "groups": grp.shape[0],
                "flat": int((grp.max(1).values == grp.min(1).values).sum()) if k > 1 else 0}
        sums.update({f"part/{n}": v.sum() for n, v in parts.items()})
        sums.update({f"adv/{n}": float(v) * scores.numel() for n, v in adv_stats.items()})
        red = self._reduce_dict(sums)
        n = red["n"]
        mean = red["r"] / n
        out = {"reward": mean, "reward_std": math.sqrt(max(red["r2"] / n - mean ** 2, 0.0) * n / max(n - 1, 1)),
               **{f"reward/{p[5:]}": v / n for p, v in red.items() if p.startswith("part/")},
               **{p[4:]: v / n for p, v in red.items() if p.startswith("adv/")},
               "response_length": red["len"] / n, "finished": red["fin"] / n,
               "zero_std_groups": red["flat"] / red["groups"] if k > 1 else float("nan"),
               **{f"reward/{s}": v for s, v in getattr(self.reward, "stats", dict)().items()},
               **upd, "rollout_s": t_roll, "update_s": time.time() - t1}
        if self._grad_norm is not None:
            out["grad_norm"] = self._grad_norm
        self.step += 1
        return out

    def _update(self, batch, data) -> dict:
        cfg, ad, method = self.cfg, self.adapter, self.method
        R, bs = batch.num_rows, cfg.train.batch_size
        mask_all = batch.response_mask
        g = torch.Generator().manual_seed(self.seed_for(self.step, salt=1))
        sums: dict[str, float] = {}
        tokens = 0.0
        n_updates = 0
        self.runner.train()
        for _ in range(cfg.update.epochs):
            perm = torch.randperm(R, generator=g).tolist() if cfg.update.epochs > 1 or self.minibatch < R \
                else list(range(R))
            for s in range(0, R, self.minibatch):
                rows = perm[s:s + self.minibatch]
                sel = mask_all[torch.as_tensor(rows, device=mask_all.device)]
                items = sel.sum() if method.agg == "token_mean" else torch.tensor(float(len(rows)))
                num_items = self._reduce(items.float().reshape(1).to(self.acc.device)).item()
                micro = [rows[i:i + bs] for i in range(0, len(rows), bs)]
                for i, mrows in enumerate(micro):
                    mb = batch.select(mrows)
                    d = _rows(data, mrows, mb.response_ids.shape[1])
                    with self.no_sync(i == len(micro) - 1), self.acc.autocast():
                        lp, hidden = sequence_logprobs(ad, mb, encoded=self.policy_features(mb), with_grad=True,
                                                       return_hidden=True, share_prefix=self.share_prefix)
                        loss, st = method.loss(self, mb, d, lp, hidden, num_items)
                    self.backward(loss)
                    ntok = float(mb.response_mask.sum())
                    with self.head_gathered():
                        st["entropy"] = self.entropy(ad, hidden.detach(), mb.response_mask, batch.temperature)
                    del hidden
                    # losses are already divided by the minibatch's global item count: they add up
                    # over micro-batches and processes; the other stats are token means
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                    for key, v in st.items():
                        sums[key] = sums.get(key, 0.0) + float(v) * (1.0 if key.endswith("loss") else ntok)
                    tokens += ntok
                n_updates += 1
                self._optimizer_step()
        red = self._reduce_dict({**sums, "_tokens": tokens})
        tok = red.pop("_tokens") or 1.0
        out = {k: v / (n_updates if k.endswith("loss") else tok) for k, v in red.items()}
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["updates"] = n_updates
        return out

    def _optimizer_step(self) -> None:
        """The engine's step for the policy (skipped while ``method.update_policy`` says so; the
        schedule still moves), then the method's own optimizer, if it has one."""
        policy = self.method.update_policy(self) if hasattr(self.method, "update_policy") else True
        gn = self.optimizer_step(update=policy)
        if gn is not None:
            self._grad_norm = gn
        if hasattr(self.method, "optimizer_step"):
            self.method.optimizer_step(self)

    # ------------------------------------------------------------------ the engine's hooks
    def layout(self) -> dict:
        """The settings that fix which prompts and samples each step draws: a resumed run keeps them."""
        ro = self.cfg.rollout
        return {"rollout.prompts_per_step": ro.prompts_per_step, "rollout.k": ro.k, "processes": self.world,
                "train.seed": self.cfg.train.seed, "prompts": len(self.records),
                "sharding": "fsdp2" if self.sharded else "none"}   # the optimizer states' layout

    def postfix(self, metrics: dict) -> dict:
        return {"reward": f"{metrics['reward']:.3f}", "kl": f"{metrics.get('kl', float('nan')):.4f}"}

    def evaluate_at_start(self) -> bool:
        return True
