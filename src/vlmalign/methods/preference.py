"""The offline preference loop the DPO family (:mod:`.dpo`, its listwise loss in :mod:`.listwise`)
and KTO (:mod:`.kto`) share: the step's base class (reference values looked up or computed), the
run once the data is tokenized (:func:`fit`: trainable parts, reference, engine, the optional
precomputed reference cache of :mod:`.ref_cache`) and the held-out evaluation."""

from __future__ import annotations

import logging

import torch

from ..engine.trainer import Trainer, TrainResult
from ..errors import VlmalignError
from .setup import prepare_trainable
from .logps import Reference, prefix_sharing_problem
from .reference import build_reference, disable_dropout, starting_copy

log = logging.getLogger(__name__)


class PreferenceMethod:
    """The step of an offline preference method on the engine's :class:`~vlmalign.engine.trainer.Trainer`.

    ``section``: the method's config section (it has ``prefix_sharing``); ``ref``: a
    :class:`~vlmalign.methods.logps.Reference`, or ``ref_values``: precomputed reference values
    (name -> (N,) tensor indexed by example position). A subclass defines ``quantities(batch,
    token_logps) -> {name: (B,)}`` and ``compute_loss``."""

    def __init__(self, adapter, section, ref: Reference | None = None, ref_values: dict | None = None):
        self.adapter = adapter
        self.cfg = section
        self.ref = ref
        self.ref_values = ref_values

    def count_items(self, batch) -> int:
        return batch.size

    def quantities(self, batch, token_lp: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def reference_quantities(self, batch, policy_encoded=None) -> dict[str, torch.Tensor]:
        """Reference values for the batch: looked up in ``ref_values`` or computed (no grad)."""
        if self.ref_values is not None:
            idx = batch.tensors["example_index"]
            if bool((idx < 0).any()):
                raise VlmalignError("precomputed reference log-probs need indexed examples (index_examples)")
            return {k: v.to(idx.device)[idx] for k, v in self.ref_values.items()}
        if policy_encoded is None and self.ref.share_features:
            with torch.no_grad():
                policy_encoded = batch.encode(self.adapter)
        lp = self.ref.token_logps(batch, policy_encoded, share_prefix=self.cfg.prefix_sharing)
        return {k: v.detach() for k, v in self.quantities(batch, lp).items()}


def make_evaluator(method_for_eval, examples, collate, batch_size):
    """Held-out loss and the method's other metrics (DPO: reward accuracy, rewards, margin), means
    over examples, post-processed by the method's ``step_metrics`` where it has one."""

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        model = method_for_eval.adapter.model
        was = model.training
        model.eval()
        tot: dict[str, float] = {}
        n = 0
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i:i + batch_size]).to(method_for_eval.adapter.device)
            _, sums = method_for_eval.compute_loss(b, b.size)
            n += b.size
            for k, v in sums.items():
                tot[k] = tot.get(k, 0.0) + float(v)
        tot.pop("items", None)
        if was:
            model.train()
        out = {k: v / max(n, 1) for k, v in tot.items()}
        return method_for_eval.step_metrics(out) if hasattr(method_for_eval, "step_metrics") else out

    return evaluate



def fit(cfg, name: str, adapter, method_cls, examples, collate, eval_examples=(), ecollate=None, *,
        needs_ref: bool = True, cache_parts: dict | None = None, callbacks=()) -> tuple[TrainResult, object]:
    """The run every offline preference method shares once its data is tokenized (DPO losses,
    listwise DPO, KTO): trainable parts, the reference (:func:`~.reference.build_reference`), the
    engine, and with ``precompute_ref_logps`` the cached reference values (``cache_parts``: what
    the loss's quantities depend on, part of the cache key). ``name``: the method's config
    section (``dpo``, ``kto``); ``method_cls(adapter, section, ref=)`` is the step function.
    Returns ``(TrainResult, adapter)``."""
    from . import ref_cache
    d = getattr(cfg, name)
    copy_ref = starting_copy(adapter, cfg) if needs_ref else None
    lora_base_fp = None
    if needs_ref and d.precompute_ref_logps and cfg.lora.enabled and not cfg.ref.path:
        lora_base_fp = ref_cache.module_fingerprint(adapter.model.state_dict().items())
    model, projector, vision = prepare_trainable(adapter, cfg)
    if d.disable_dropout:
        disable_dropout(model)
    reference, ref_ad = build_reference(cfg, adapter, model, copy_ref, no_dropout=d.disable_dropout) \
        if needs_ref else (None, None)
    if reference is not None:
        log.info(reference.describe())
    why = prefix_sharing_problem(adapter) if d.prefix_sharing else f"{name}.prefix_sharing=false"
    log.info("prefix sharing: " + ("on" if why is None else f"off ({why})"))
    method = method_cls(adapter, d, ref=reference)
    eval_method = method_cls(adapter, d, ref=reference) if eval_examples else None
    evaluate = None
    if eval_examples:
        evaluate = make_evaluator(eval_method, eval_examples, ecollate, cfg.train.batch_size)
    trainer = Trainer(method=method, model=model, processor=adapter.processor, examples=examples,
                      collate=collate, train_cfg=cfg.train, optim_cfg=cfg.optim, config=cfg, evaluate=evaluate,
                      adapters=[adapter], projector_names=projector, vision_names=vision, callbacks=callbacks)
    if ref_ad is not None:
        ref_ad.model.to(trainer.acc.device)
    if needs_ref and d.precompute_ref_logps:
        fp = lora_base_fp or ref_cache.module_fingerprint(ref_ad.model.state_dict().items())
        for m, exs, col, f in ((method, examples, collate, cfg.data.train_file),
                               (eval_method, eval_examples, ecollate, cfg.data.eval_file)):
            if m is None:
                continue
            m.ref_values = _precomputed(cfg, d, m, exs, col, f, fp, adapter, trainer, cache_parts)
        for m in (method, eval_method):
            if m is not None:
                m.ref = None
        del reference, ref_ad, copy_ref  # the reference model is no longer needed
    return trainer.train(), adapter


def _precomputed(cfg, d, method, examples, collate, data_file, ref_fp, adapter, trainer, loss_parts):
    """The reference values of ``examples``: loaded from the cache, or computed once and stored."""
    from . import ref_cache
    from ..data.loading import data_root
    ref_model = method.ref.adapter.model
    parts = ref_cache.key_parts(
        data_file=data_file, data_cfg=cfg.data, image_root=data_root(cfg.data, data_file), examples=examples,
        adapter=adapter,
        reference={"weights": ref_fp, "kind": method.ref.kind, "dtype": str(next(ref_model.parameters()).dtype),
                   "precision": trainer.acc.mixed_precision},
        loss=loss_parts)
    cache = ref_cache.RefLogpsCache(d.ref_cache_dir or ref_cache.default_cache_dir(), parts)

    def compute():
        # on the plain module: the main process may compute while the others wait at the barrier
        # (sharded or ZeRO-3: every process computes, each forward needs them all)
        with trainer.phase("reference_precompute", examples=len(examples)), trainer.no_grad_pass():
            return ref_cache.compute_values(method, examples, collate, cfg.train.batch_size, trainer.acc.device)

    values = ref_cache.load_or_compute(cache, len(examples), compute, main_process=trainer.acc.is_main_process,
                                       barrier=trainer.acc.wait_for_everyone,
                                       any_process=trainer.any_process if trainer.collective_forwards else None)
    return {k: v.to(trainer.acc.device) for k, v in values.items()}
