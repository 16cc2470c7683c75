"""The training engine: one loop for every method, offline and online.

:class:`Engine` owns what every run shares: the accelerator (processes, precision), the run
directory, the optimizer and learning-rate schedule, gradient clipping, the non-finite stop,
checkpoints and resume, the step loop (progress, periodic saves, signals: :mod:`.loop`),
evaluation every ``train.eval_every`` steps and at the end, metric logging and
:mod:`callbacks <.callbacks>`. A *step strategy* subclass supplies ``train_step()`` (one
optimizer step's work, returning its metrics) and ``layout()`` (what a resumed run must keep):

* :class:`Trainer` -- offline data (SFT, reward models, the DPO family, KTO). A *method* owns the
  maths of one micro-batch::

      method.count_items(batch) -> int            # what the loss is averaged over (tokens, pairs)
      method.compute_loss(batch, num_items) -> (loss, sums)   # sums: summed metrics + "items"
      method.step_metrics(metrics) -> metrics     # optional: post-process the step's means

  Each optimizer step takes ``grad_accum`` micro-batches per process. Their item counts are
  summed over micro-batches and processes first, and each micro-batch loss is divided by that
  global count, so an accumulated or distributed step produces the same gradient as one big
  batch. Data order is a seeded permutation per epoch; the checkpoint stores the step, so a
  resumed run sees exactly the batches an uninterrupted run would.
* :class:`~.online.OnlineTrainer` -- online RL (GRPO, RLOO, PPO): rollout -> rewards ->
  advantages -> minibatch updates, on the same engine.

A method may also keep state in checkpoints (``state_dict()`` / ``load_state_dict()``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from accelerate.utils import DistributedType

from ..config import validate_config
from ..errors import VlmalignError
from ..models.prompt_layout import detect_layout
from .checkpoint import check_resume_layout, latest_checkpoint, load_trainer_state, load_weights_into, \
    save_checkpoint, set_rng_state
from .callbacks import Callback, notify, phase
from .loop import final_evaluation, run_steps
from .run_dir import RunDir, claim_output_dir
from . import sharding
from .scaling import ScalingError, check_launch, deepspeed_backend, make_optimizer

log = logging.getLogger(__name__)


class NonFiniteLossError(VlmalignError):
    pass


@dataclass
class TrainResult:
    step: int
    metrics: dict
    checkpoint: str | None


def _accelerator(train_cfg, *, engine_shards: bool = False, deepspeed: bool = False):
    """accelerate's Accelerator for the run. ``engine_shards``: the engine applies FSDP2 itself
    (engine/sharding.py), so accelerate is built as for DDP (the processes, their process group,
    precision), with an FSDP launch's ``ACCELERATE_USE_FSDP`` hidden from it while it is built."""
    from accelerate import Accelerator
    prec = train_cfg.precision
    if prec == "auto":
        prec = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[prec]
    hidden = os.environ.pop("ACCELERATE_USE_FSDP", None) if engine_shards else None
    cpu = not torch.cuda.is_available()
    kw = {}
    if cpu and deepspeed:
        # DeepSpeed on CPU processes (DS_ACCELERATOR=cpu, engine/scaling.py): accelerate builds its
        # DeepSpeed state only without cpu=True, and then forms no process group unless told the
        # backend (it finds no CUDA backend, and would run every process as its own rank 0)
        from accelerate.utils import InitProcessGroupKwargs
        kw["kwargs_handlers"] = [InitProcessGroupKwargs(backend=deepspeed_backend())]
        cpu = False
    try:
        # cpu=True lets accelerate form a gloo process group when launched with several CPU processes
        return Accelerator(mixed_precision=mp, log_with=train_cfg.report_to or None,
                           project_dir=train_cfg.output_dir, cpu=cpu, **kw)
    finally:
        if hidden is not None:
            os.environ["ACCELERATE_USE_FSDP"] = hidden


def base_param_name(n: str) -> str:
    """A parameter's name in the plain model (PEFT adds prefixes and modules_to_save copies)."""
    if n.startswith("base_model.model."):
        n = n[len("base_model.model."):]
    return n.replace(".modules_to_save.default.", ".")


def _param_groups(model, optim_cfg, projector_names: set[str], vision_names: set[str] = frozenset()):
    """AdamW groups: decay / no decay (biases, norms, 1-d), and the projector and vision tower
    at their own learning rates when ``optim.projector_lr`` / ``optim.vision_lr`` are set."""
    groups: dict[tuple, list] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        base = base_param_name(n)
        lr = None
        if optim_cfg.projector_lr is not None and base in projector_names:
            lr = optim_cfg.projector_lr
        elif optim_cfg.vision_lr is not None and base in vision_names:
            lr = optim_cfg.vision_lr
        decay = not (p.ndim < 2 or "norm" in n.lower() or n.endswith(".bias"))
        groups.setdefault((lr, decay), []).append(p)
    out = []
    for (lr, decay), params in groups.items():
        g = {"params": params, "weight_decay": optim_cfg.weight_decay if decay else 0.0}
        if lr is not None:
            g["lr"] = lr
        out.append(g)
    return out


class Engine:
    """What every loop shares (module docstring). ``n_items``: training examples (or prompts);
    ``per_step``: how many of them one optimizer step consumes per process; ``updates_per_step``:
    optimizer updates per step (the schedule's length is steps x updates); ``extra_groups``:
    further optimizer parameter groups; ``extra_modules``: modules checkpointed beside the model
    (``NAME.safetensors``) and reloaded on resume (under FSDP2 the method shards what holds them:
    ``method.shard_modules(shard)``, :meth:`_shard_extra`); ``records``: the training records,
    whose prompt layout is written beside the weights for chat / generate."""

    desc = "train"
    # why this strategy cannot run sharded (None: it can; engine/sharding.py)
    unshardable: str | None = None

    def __init__(self, *, method, model, processor, train_cfg, optim_cfg, config=None, n_items: int,
                 per_step: int, updates_per_step: int = 1, extra_groups: Sequence = (),
                 extra_modules: dict | None = None, adapters: Sequence = (),
                 projector_names: set[str] | None = None, vision_names: set[str] | None = None,
                 records=(), evaluate: Callable[[int], dict] | None = None,
                 callbacks: Sequence[Callback] = (), empty_message: str = "nothing to train on"):
        self.method = method
        self.model = model
        self.processor = processor
        self.tc = train_cfg
        self.oc = optim_cfg
        self.evaluate = evaluate
        self.adapters = list(adapters)
        self.extra_modules = extra_modules or {}
        # a config's eval.tasks (benchmark evals on this model, eval/during_training.py) watch the run
        from ..eval.during_training import task_callbacks
        self._task_evals = task_callbacks(config)
        self.callbacks = [*callbacks, *self._task_evals]
        # where the training prompts put their images: written beside the weights for chat / generate
        self.prompt_layout = detect_layout(records)
        validate_config(config if config is not None else train_cfg)
        if not n_items:
            raise VlmalignError(empty_message)
        claim_output_dir(train_cfg)
        # DeepSpeed / FSDP / offload: refused where they cannot run
        self.launch = check_launch(optim_cfg.name, sharding=train_cfg.sharding, precision=train_cfg.precision)
        self.sharded = self.launch.sharding == "fsdp"   # the engine shards with FSDP2 (engine/sharding.py)
        if self.sharded:
            self._check_shardable()
        self.acc = _accelerator(train_cfg, engine_shards=self.sharded, deepspeed=self.launch.sharding == "deepspeed")
        self.run = RunDir(train_cfg.output_dir, main_process=self.acc.is_main_process)
        if config is not None:
            self.run.save_config(config)
        self.deepspeed = self.acc.distributed_type == DistributedType.DEEPSPEED
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        if self.sharded and not torch.distributed.is_initialized():
            log.info("FSDP2 sharding asked for, but this process was not launched with others (no process "
                     "group): the model stays whole")
            self.sharded = False
        per = per_step * self.world
        self.steps_per_epoch = math.ceil(n_items / per) if self.world == 1 else max(1, n_items // per)
        self.total_steps = self.tc.max_steps if self.tc.max_steps > 0 else \
            max(1, math.ceil(self.steps_per_epoch * self.tc.epochs))
        extra_groups = list(extra_groups)
        if not any(p.requires_grad for p in self.model.parameters()) and \
                not any(p.requires_grad for g in extra_groups for p in g["params"]):
            raise VlmalignError("nothing to train: every parameter is frozen")
        self._preloaded = None
        self.extra_roots: list = []   # the modules sharded beside the model (_shard_extra)
        if self.sharded:
            # a resumed run's weights (the model's and the extra modules') go in before sharding
            # (the checkpoint holds full tensors); its optimizer state after it (resume())
            if self.tc.resume:
                self._preloaded = self._load_checkpoint_weights()
            self.mesh = sharding.device_mesh(self.acc.device.type)
            sharding.shard(self.model, [u for ad in self.adapters for u in ad.shard_units()],
                           device_type=self.acc.device.type, offload=self.launch.offloads, mesh=self.mesh,
                           replicated=[p for ad in self.adapters for p in ad.replicated_parameters()])
            if self.extra_modules:
                # the method shards the modules it trains beside the model and rebuilds what holds
                # their parameters (its optimizer, the checkpointed views) on the shards
                self.method.shard_modules(self._shard_extra)
        groups = _param_groups(self.model, self.oc, projector_names or set(), vision_names or set())
        groups += extra_groups
        self.optimizer = make_optimizer(groups, self.oc)
        from transformers import get_scheduler
        updates = self.total_steps * updates_per_step
        warm = self.oc.warmup_steps if self.oc.warmup_steps > 0 else int(self.oc.warmup_ratio * updates)
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[self.oc.schedule]
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=warm, num_training_steps=updates)
        if self.sharded:
            # sharded in place above: accelerate keeps the optimizer (precision), not the model (no DDP)
            self.runner, self.optimizer = self.model, self.acc.prepare(self.optimizer)
        else:
            if self.deepspeed:
                self._configure_deepspeed()
            # model and optimizer are prepared together: DeepSpeed builds its engine only then.
            # The scheduler stays ours (accelerate's would step once per process).
            self.runner, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        for ad in self.adapters:
            ad.runner = self.runner
        # every process must run each forward of the trained model together: FSDP2 shards, or
        # ZeRO-3's partitioned parameters (gathered collectively in each forward)
        self.collective_forwards = self.sharded or (
            self.deepspeed and self.acc.state.deepspeed_plugin.zero_stage == 3)
        self.step = 0

    def _configure_deepspeed(self) -> None:
        """The run's settings into accelerate's DeepSpeed config before ``prepare`` builds the
        DeepSpeed engine. The engine feeds its own micro-batches (no dataloader is prepared), so
        ``train_micro_batch_size_per_gpu`` comes from ``train.batch_size``. DeepSpeed's own
        accumulation stays at 1: the engine divides every micro-batch's loss by the step's global
        item count itself (DeepSpeed would divide again by its ``gradient_accumulation_steps``),
        and marks the last micro-batch of a step as the accumulation boundary (:meth:`no_sync`),
        where accelerate runs DeepSpeed's step. Clipping is DeepSpeed's (``gradient_clipping``:
        ``optim.max_grad_norm``)."""
        ds = self.acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = self.tc.batch_size
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = self.tc.batch_size * self.world
        ds["gradient_clipping"] = float(self.oc.max_grad_norm or 0.0)

    def _check_shardable(self) -> None:
        """Refuse what FSDP2 sharding does not run: every process must take part in each forward
        of the sharded model, with the same number of forwards."""
        what = "train.sharding=fsdp2" if self.launch.source == "train.sharding" else "an FSDP launch"
        if self.unshardable:
            raise ScalingError(f"{what}: {self.unshardable}; use train.sharding=none (DDP)")
        if self.extra_modules and not hasattr(self.method, "shard_modules"):
            raise ScalingError(f"{what}: the modules trained beside the model ({', '.join(self.extra_modules)}) "
                               "are not sharded; use train.sharding=none (DDP)")
        if self._task_evals:
            raise ScalingError(f"{what}: eval.tasks generates answers with the model, which sharding does not "
                               "run; evaluate the saved checkpoint with `vlmalign eval` instead")

    def _shard_extra(self, root, units, replicated=()):
        """FSDP2 for a module trained beside the model (``method.shard_modules`` calls it): the
        model's mesh and offload; ``root`` is then a sharded root of its own, whose gradient
        reduction follows the model's (:meth:`no_sync`; ``replicated``: parameters kept whole,
        :func:`sharding.shard`). Returns ``root``."""
        sharding.shard(root, units, device_type=self.acc.device.type, offload=self.launch.offloads, mesh=self.mesh,
                       replicated=replicated)
        self.extra_roots.append(root)
        return root

    def _load_checkpoint_weights(self):
        """The latest checkpoint's weights into the (not yet sharded) model and extra modules:
        the path, or None."""
        ck = latest_checkpoint(self.run.checkpoints)
        if ck is not None:
            load_weights_into(self.model, ck / "model")
            self._load_extra_modules(ck)
        return ck

    def _load_extra_modules(self, ck) -> None:
        from safetensors.torch import load_file
        for name, mod in self.extra_modules.items():
            mod.load_state_dict(load_file(str(ck / f"{name}.safetensors")))

    # ---------------------------------------------------------------- what a strategy supplies
    def train_step(self) -> dict:
        raise NotImplementedError

    def layout(self) -> dict:
        """The settings that fix what each step sees: a resumed run must keep them."""
        raise NotImplementedError

    def postfix(self, metrics: dict) -> dict:
        return {"loss": f"{metrics.get('loss', float('nan')):.4f}"}

    # ---------------------------------------------------------------- shared pieces
    def _order(self, epoch: int, n: int) -> list[int]:
        """The seeded order of ``n`` training items in ``epoch`` (the same on every process and
        after a resume)."""
        g = torch.Generator().manual_seed(self.tc.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(t, reduction="sum") if self.world > 1 else t

    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (every process must call it)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return self._reduce(t).item() > 0

    def _reduce_dict(self, sums: dict) -> dict:
        """Each value (a number or a 0-d tensor) summed over processes, in one collective."""
        keys = sorted(sums)
        if not keys:
            return {}
        dev = self.acc.device
        # float64 from the start: a Python float must not pass through float32 on its way
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=dev).reshape(()) for k in keys])
        return dict(zip(keys, self._reduce(vec).tolist()))

    def _last_ckpt(self) -> str:
        ck = latest_checkpoint(self.run.checkpoints)
        return str(ck) if ck else "none written yet"

    def _check_finite(self, loss: torch.Tensor) -> None:
        flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.acc.device)
        if self._reduce(flag).item() > 0:
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.step + 1}; the run is stopped without "
                f"updating the weights, and the last good checkpoint is kept ({self._last_ckpt()})")

    def backward(self, loss: torch.Tensor) -> None:
        """Stop on a non-finite loss, else backpropagate it (DDP averages gradients over
        processes: the loss is scaled by the process count so that they add up instead)."""
        self._check_finite(loss)
        self.acc.backward(loss * self.world)

    def no_sync(self, last: bool):
        """No gradient all-reduce (sharded: reduce-scatter) on a micro-batch that is not the last
        before an update: a context around the micro-batch's forward (DDP reads it there; FSDP2
        at the backward that follows, so sharded the setting stays until the next micro-batch)."""
        if self.sharded:
            for root in (self.runner, *self.extra_roots):
                sharding.set_gradient_sync(root, last)
            return contextlib.nullcontext()
        if self.deepspeed:
            # accelerate's backward runs DeepSpeed's step (reduce, clip, update) where gradients sync
            self.acc.gradient_state._set_sync_gradients(last)
            return contextlib.nullcontext()
        return self.acc.no_sync(self.runner) if (not last and self.world > 1) else contextlib.nullcontext()

    def optimizer_step(self, *, update: bool = True) -> float | None:
        """Clip (``optim.max_grad_norm``), step the optimizer (unless ``update`` is False) and the
        schedule, zero the gradients. Returns the gradient norm before clipping (None: not clipped)."""
        gn = None
        mg = self.oc.max_grad_norm
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if update and self.sharded:
            # the parameters sharding kept whole: their gradients averaged here (FSDP2 reduced the rest)
            sharding.average_replicated_grads(list(self.model.parameters()))
        if update and mg and mg > 0:
            gn = sharding.clip_grad_norm_(params, mg) if self.sharded else self.acc.clip_grad_norm_(params, mg)
            if gn is not None and not torch.isfinite(torch.as_tensor(gn)):
                raise NonFiniteLossError(f"non-finite gradient norm at step {self.step + 1}; the run is "
                                         f"stopped and the last good checkpoint is kept ({self._last_ckpt()})")
        if update:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None if gn is None else float(gn)

    @contextlib.contextmanager
    def no_grad_pass(self):
        """Forwards without gradients on the plain module (no DDP collectives or buffer syncs, so
        one process may run them alone; a module sharded with FSDP2 gathers its parameters in
        each forward, so there every process must run them), in eval mode and under the run's
        autocast."""
        plain = self.acc.unwrap_model(self.runner)
        for ad in self.adapters:
            ad.runner = plain
        was = plain.training
        plain.eval()
        try:
            with torch.no_grad(), self.acc.autocast():
                yield
        finally:
            for ad in self.adapters:
                ad.runner = self.runner
            plain.train(was)

    def phase(self, name: str, **info):
        """A context around a named part of the run (``step``, ``reference_precompute``) that
        the callbacks see (e.g. a benchmark timing it)."""
        return phase(self.callbacks, self, name, **info)

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> str | None:
        self.acc.wait_for_everyone()
        path = None
        optim = extra = None
        if self.sharded:
            # FSDP2 shards, gathered collectively on every process into full CPU tensors
            weights = sharding.full_model_state(self.runner)
            optim = sharding.full_optimizer_state(self.runner, self.optimizer)
            extra = {name: sharding.full_model_state(mod) for name, mod in self.extra_modules.items()}
        elif self.acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            # sharded weights (ZeRO-3) are gathered collectively, on every process
            weights = self.acc.get_state_dict(self.runner)
        else:
            weights = None
        # on every process: a method whose modules are sharded gathers their state collectively
        method_state = self.method.state_dict() if hasattr(self.method, "state_dict") else {}
        if self.acc.is_main_process:
            state = {"optimizer": optim if self.sharded else self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "total_steps": self.total_steps, "layout": self.layout(), "method": method_state}
            path = str(save_checkpoint(self.run.checkpoints, self.step, self.acc.unwrap_model(self.runner),
                                       self.processor, state, keep_last=self.tc.keep_last,
                                       extra_modules=self.extra_modules, extra_states=extra, state_dict=weights,
                                       prompt_layout=self.prompt_layout))
        self.acc.wait_for_everyone()
        return path

    def resume(self) -> bool:
        ck = latest_checkpoint(self.run.checkpoints)
        if ck is None:
            log.info("no checkpoint in %s: starting from scratch", self.run.checkpoints)
            return False
        if self.deepspeed:
            raise ScalingError(
                f"train.resume=true under DeepSpeed: {ck} holds the full weights but only process 0's "
                f"partition of DeepSpeed's optimizer state, which the other processes cannot take up; resuming "
                f"a ZeRO run is not supported yet. Start from its weights instead: model.path={ck / 'model'} "
                f"(a LoRA checkpoint: `vlmalign export` it first) in a new output_dir")
        st = load_trainer_state(ck)
        check_resume_layout(st, self.layout(), ck)
        if self.sharded:
            if ck != self._preloaded:   # the weights went in before sharding, from this checkpoint
                raise VlmalignError(f"{ck}: a checkpoint appeared after the run started; start it again")
            sharding.load_optimizer_state(self.runner, self.optimizer, st["optimizer"])
        else:
            load_weights_into(self.acc.unwrap_model(self.runner), ck / "model")
            self.optimizer.load_state_dict(st["optimizer"])
        if self.extra_modules and not self.sharded:   # sharded: they went in before sharding
            self._load_extra_modules(ck)
        self.scheduler.load_state_dict(st["scheduler"])
        if hasattr(self.method, "load_state_dict"):
            self.method.load_state_dict(st.get("method", {}))
        set_rng_state(st["rng"])
        self.step = int(st["step"])
        self.run.truncate_metrics_after(self.step)
        if self.acc.is_main_process:
            log.info("resumed from %s at step %d", ck, self.step)
        return True

    # ---------------------------------------------------------------- the run
    def _log(self, rec: dict) -> None:
        self.run.log(rec)
        if self.tc.report_to:
            self.acc.log(rec, step=rec["step"])

    def evaluate_at_start(self) -> bool:
        """Whether to evaluate before the first step (online RL: the reward the run starts from)."""
        return False

    def _one_step(self, t0: float) -> dict:
        with self.phase("step"):
            m = self.train_step()
        rec = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "time": time.time() - t0,
               **{(k if k == "lr" else f"train/{k}"): v for k, v in m.items()}}
        evaluated = False
        if self.evaluate is not None and self.tc.eval_every and self.step % self.tc.eval_every == 0 \
                and self.step < self.total_steps:
            rec.update({f"eval/{k}": v for k, v in self.evaluate(self.step).items()})
            evaluated = True
        if evaluated or self.step % max(1, self.tc.log_every) == 0 or self.step == self.total_steps:
            self._log(rec)
        notify(self.callbacks, "on_step_end", self, m)
        return m

    def train(self) -> TrainResult:
        if self.tc.report_to:
            self.acc.init_trackers("vlmalign", config={})
        resumed = self.resume() if self.tc.resume else False
        notify(self.callbacks, "on_train_begin", self)
        if self.evaluate is not None and self.evaluate_at_start() and not resumed and self.step == 0:
            self._log({"step": 0, **{f"eval/{k}": v for k, v in self.evaluate(0).items()}})
        t0 = time.time()
        last = run_steps(self, self.tc, one_step=lambda: self._one_step(t0), save=self.save,
                         postfix=self.postfix, last_checkpoint=self._last_ckpt, desc=self.desc)
        ckpt = self.save()  # before the final evaluation: an evaluation that fails never costs the weights
        final_eval = {}
        if self.evaluate is not None:
            final_eval = final_evaluation(self.evaluate, self.step, ckpt, log)
            self._log({"step": self.step, **final_eval})
        self.run.plot()
        if self.tc.report_to:
            self.acc.end_training()
        result = TrainResult(self.step, {**last, **final_eval}, ckpt)
        notify(self.callbacks, "on_train_end", self, result)
        return result


class Trainer(Engine):
    """The offline step strategy: ``grad_accum`` micro-batches of ``examples`` per process and
    optimizer step, each ``method.compute_loss``; ``collate`` builds a micro-batch."""

    def __init__(self, *, method, model, processor, examples: Sequence, collate: Callable,
                 train_cfg, optim_cfg, config=None, evaluate: Callable[[int], dict] | None = None,
                 adapters: Sequence = (), projector_names: set[str] | None = None,
                 vision_names: set[str] | None = None, extra_modules: dict | None = None,
                 callbacks: Sequence[Callback] = ()):
        self.examples = list(examples)
        self.collate = collate
        extra_modules = extra_modules or {}
        extra_groups = [{"params": [p for p in m.parameters() if p.requires_grad], "weight_decay": 0.0}
                        for m in extra_modules.values()]
        super().__init__(method=method, model=model, processor=processor, train_cfg=train_cfg,
                         optim_cfg=optim_cfg, config=config, n_items=len(self.examples),
                         per_step=train_cfg.batch_size * train_cfg.grad_accum, extra_groups=extra_groups,
                         extra_modules=extra_modules, adapters=adapters, projector_names=projector_names,
                         vision_names=vision_names, records=(getattr(e, "record", None) for e in self.examples),
                         evaluate=evaluate, callbacks=callbacks,
                         empty_message="no training examples (every record of the training file was skipped "
                                       "or the file is empty)")
        self.global_batch = self.tc.batch_size * self.tc.grad_accum * self.world

    def _micro_batches(self, step: int) -> list:
        """This process's micro-batches for global optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self._order(epoch, len(self.examples))
        chunk = order[k * self.global_batch:(k + 1) * self.global_batch]
        mine = chunk[self.rank::self.world]
        bs = self.tc.batch_size
        out = []
        for i in range(self.tc.grad_accum):
            idx = mine[i * bs:(i + 1) * bs]
            if idx:
                out.append(self.collate([self.examples[j] for j in idx]))
        return out

    def layout(self) -> dict:
        return {"train.batch_size": self.tc.batch_size, "train.grad_accum": self.tc.grad_accum,
                "processes": self.world, "train.seed": self.tc.seed, "examples": len(self.examples),
                "sharding": "fsdp2" if self.sharded else "none"}   # the optimizer state's layout

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict:
        micro = self._micro_batches(self.step)
        counts = torch.tensor([float(sum(self.method.count_items(b) for b in micro))], device=self.acc.device)
        total = self._reduce(counts).item()
        sums: dict[str, torch.Tensor] = {}
        self.runner.train()
        for i, batch in enumerate(micro):
            batch = batch.to(self.acc.device)
            with self.no_sync(i == len(micro) - 1), self.acc.autocast():
                loss, m = self.method.compute_loss(batch, total)
            self.backward(loss)
            for k, v in m.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        if not micro:  # keep collectives aligned on a process without data this step
            self.acc.backward(sum(p.sum() * 0 for p in self.model.parameters() if p.requires_grad))
        lr = self.scheduler.get_last_lr()[0]  # the rate this update used
        gn = self.optimizer_step()
        self.step += 1
        red = self._reduce_dict(sums)
        items = red.pop("items", total) or 1.0
        out = {k: v / items for k, v in red.items()}
        out["items"] = items
        if gn is not None:
            out["grad_norm"] = gn
        out["lr"] = lr
        if hasattr(self.method, "step_metrics"):
            out = self.method.step_metrics(out)
        return out
