"""The DPO family on vision-language models: DPO (sigmoid), cDPO, IPO, hinge, SimPO, ORPO,
token-weighted DPO (RLHF-V's dense DPO), mDPO, and listwise DPO on ranked lists
(``methods/listwise.py``; KTO, which shares ``fit``, is ``methods/kto.py``).

Per micro-batch: the batch's unique images are encoded once and serve chosen, rejected and the
reference (when the vision tower and projector are frozen and the same in both); each prompt
runs once and chosen/rejected continue from its key/value cache where that is exact
(``dpo.prefix_sharing``); reference log-probs come from the policy with its LoRA adapters
disabled, a separate frozen model, or a cache computed once before training
(``dpo.precompute_ref_logps``). Loss arithmetic lives in ``losses/preference.py``; log-prob
computation in ``methods/logps.py``; the cache in ``methods/ref_cache.py``. docs/PREFERENCE.md
says which configuration shares what.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from ..config import opt, section
from ..config.sections import DataSection, LoraSection, ModelSection, OptimSection, TrainSection
from ..data.preference import CORRUPT_ROW, ROWS, Corruption, PreferenceCollator, index_examples, tokenize_pair
from ..engine.trainer import Trainer, TrainResult
from ..errors import VlmalignError
from ..losses.preference import REFERENCE_FREE_LOSSES, changed_token_weights, dpo_loss, mdpo_loss, \
    orpo_loss, preference_loss, simpo_loss, token_weighted_logps
from .common import build_adapter, prepare_trainable, load_examples, seed_everything
from .logps import Reference, completion_logps, prefix_sharing_problem

log = logging.getLogger(__name__)
LOSSES = ("sigmoid", "ipo", "hinge", "cdpo", "simpo", "orpo", "token_weighted", "mdpo", "listwise")


@dataclass
class DPOSection:
    loss: str = opt("sigmoid", "sigmoid (DPO), cdpo (DPO with label_smoothing), ipo, hinge, simpo, orpo, "
                               "token_weighted (RLHF-V dense DPO), mdpo (conditional, corrupted image), "
                               "listwise (Plackett-Luce DPO on ranked lists)", LOSSES)
    beta: float = opt(0.1, "inverse temperature (IPO: the regularisation tau; SimPO's paper uses 2.0)", gt=0)
    label_smoothing: float = opt(0.0, "cDPO: probability that a label is flipped (sigmoid/cdpo/token_weighted)", ge=0, lt=0.5)
    ipo_average: bool = opt(True, "IPO on log-ratios averaged over completion tokens (TRL, the IPO authors); "
                                  "false: summed")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin", ge=0)
    orpo_lambda: float = opt(0.1, "ORPO weight of the odds-ratio term next to the chosen NLL", ge=0)
    token_weight_gamma: float = opt(5.0, "token_weighted: weight of tokens where chosen and rejected differ", ge=0)
    token_weight_normalize: bool = opt(True, "token_weighted: divide by the summed weights (RLHF-V eq. 4)")
    mdpo_corruption: str = opt("crop", "mdpo: how the corrupted image is made (used where a record has no "
                                       "rejected_images)", ("crop", "noise"))
    mdpo_keep: float = opt(0.2, "mdpo crop: largest fraction of the image area kept", gt=0, le=1)
    mdpo_noise_std: float = opt(0.5, "mdpo noise: Gaussian noise std (pixels in 0-1)", ge=0)
    mdpo_anchor: float = opt(0.0, "mdpo: anchor the chosen reward must stay above")
    mdpo_cond_weight: float = opt(1.0, "mdpo: weight of the conditional (image) preference term", ge=0)
    mdpo_anchor_weight: float = opt(1.0, "mdpo: weight of the anchor term", ge=0)
    precompute_ref_logps: bool = opt(False, "compute reference log-probs once before training and cache them "
                                            "on disk (reused across epochs and runs)")
    ref_cache_dir: str | None = opt(None, "reference log-prob cache directory (default: $VLMALIGN_CACHE or "
                                          "~/.cache/vlmalign, then ref_logps)")
    prefix_sharing: bool = opt(True, "run each prompt once and continue chosen/rejected from its key/value "
                                     "cache where exact (falls back to full sequences otherwise, logged)")
    disable_dropout: bool = opt(True, "turn dropout off in policy (LoRA dropout included) and reference, so "
                                      "log-ratios are not noise")


@dataclass
class RefSection:
    path: str | None = opt(None, "reference model directory or hub id; default: the policy with LoRA adapters "
                                 "disabled under LoRA, else a frozen copy of the starting policy")


@dataclass
class DPOConfig:
    model: ModelSection = section(ModelSection, "policy model to start from and which parts to train")
    lora: LoraSection = section(LoraSection, "LoRA / QLoRA")
    data: DataSection = section(DataSection, "preference pairs: training and held-out files")
    optim: OptimSection = section(OptimSection, "optimizer and learning-rate schedule")
    train: TrainSection = section(TrainSection, "loop, batch sizes (in pairs), precision, checkpoints")
    dpo: DPOSection = section(DPOSection, "loss and the reference / caching / sharing options")
    ref: RefSection = section(RefSection, "reference model")


def dpo_config() -> DPOConfig:
    """Defaults: the language model learns; vision tower and projector stay frozen (so one image
    encoding serves policy and reference); a DPO-sized learning rate."""
    cfg = DPOConfig()
    cfg.model.train_vision = False
    cfg.model.train_projector = False
    cfg.optim.lr = 5e-6
    cfg.optim.warmup_ratio = 0.1
    return cfg


def _validate(d: DPOSection) -> None:
    if d.loss not in LOSSES:
        raise VlmalignError(f"dpo.loss {d.loss!r} is not one of {', '.join(LOSSES)}")
    if d.loss == "cdpo" and not d.label_smoothing > 0:
        raise VlmalignError("dpo.loss=cdpo needs dpo.label_smoothing in (0, 0.5]")
    if d.label_smoothing and d.loss not in ("sigmoid", "cdpo", "token_weighted"):
        raise VlmalignError(f"dpo.label_smoothing applies to sigmoid/cdpo/token_weighted, not {d.loss}")


def corruption_of(d: DPOSection, seed: int) -> Corruption | None:
    if d.loss != "mdpo":
        return None
    return Corruption(kind=d.mdpo_corruption, keep=d.mdpo_keep, noise_std=d.mdpo_noise_std, seed=seed)


class DPOMethod:
    """One micro-batch of the configured preference loss (``compute_loss(batch, num_items)``).

    ``ref``: a :class:`~vlmalign.methods.logps.Reference` (None for reference-free losses or when
    ``ref_values`` holds precomputed values: name -> (N,) tensor indexed by example position).
    """

    batch_kind = "pairs"   # ListwiseMethod (methods/listwise.py): "ranked"

    def __init__(self, adapter, cfg, ref: Reference | None = None, ref_values: dict | None = None):
        cfg = getattr(cfg, "dpo", cfg)  # a DPOConfig or its dpo section
        _validate(cfg)
        if (cfg.loss == "listwise") != (self.batch_kind == "ranked"):
            raise VlmalignError("dpo.loss=listwise is computed by methods.listwise.ListwiseMethod on ranked lists, "
                                "the other losses by DPOMethod on pairs")
        self.adapter = adapter
        self.cfg = cfg
        self.ref = ref
        self.ref_values = ref_values
        self.needs_ref = cfg.loss not in REFERENCE_FREE_LOSSES
        if self.needs_ref and ref is None and ref_values is None:
            raise VlmalignError(f"dpo.loss={cfg.loss} needs a reference (model or precomputed values)")

    def count_items(self, batch) -> int:
        return batch.size

    # ----------------------------------------------------------------- per-row reductions
    def quantities(self, batch, token_lp: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per pair (B,): summed log-prob of each row group (chosen, rejected, ...), and for
        token_weighted the weighted log-probs (``<name>_w``)."""
        mask = batch.tensors["completion_mask"]
        sums = token_lp.sum(1)                                        # (R,)
        q = {n: batch.group(sums, n) for n in batch.row_names}
        if self.cfg.loss == "token_weighted":
            ids = batch.tensors["completion_ids"]
            cm, rm = batch.group(mask, "chosen"), batch.group(mask, "rejected")
            wc, wr = changed_token_weights(batch.group(ids, "chosen"), batch.group(ids, "rejected"), cm, rm,
                                           gamma=self.cfg.token_weight_gamma, dtype=token_lp.dtype)
            for n, w, m in (("chosen", wc, cm), ("rejected", wr, rm)):
                q[n + "_w"] = token_weighted_logps(batch.group(token_lp, n), m, w,
                                                   normalize=self.cfg.token_weight_normalize)
        return q

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

    # ----------------------------------------------------------------- the loss
    def losses(self, batch, q: dict, rq: dict | None):
        d = self.cfg
        mask = batch.tensors["completion_mask"]
        n = mask.sum(1).to(q["chosen"].dtype)
        nc, nr = batch.group(n, "chosen"), batch.group(n, "rejected")
        pc, pr = q["chosen"], q["rejected"]
        if d.loss in ("sigmoid", "cdpo", "hinge", "ipo"):
            rc, rr = rq["chosen"], rq["rejected"]
            if d.loss == "ipo" and d.ipo_average:
                pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
            return preference_loss(d.loss, policy_chosen=pc, policy_rejected=pr, ref_chosen=rc,
                                   ref_rejected=rr, beta=d.beta, label_smoothing=d.label_smoothing)
        if d.loss == "token_weighted":
            return dpo_loss(q["chosen_w"], q["rejected_w"], rq["chosen_w"], rq["rejected_w"], beta=d.beta,
                            label_smoothing=d.label_smoothing)
        if d.loss == "simpo":
            return simpo_loss(pc / nc, pr / nr, beta=d.beta, gamma=d.simpo_gamma)
        if d.loss == "orpo":
            return orpo_loss(pc / nc, pr / nr, -pc / nc, lam=d.orpo_lambda)
        return mdpo_loss(pc, pr, rq["chosen"], rq["rejected"], q["chosen_corrupt"], rq["chosen_corrupt"],
                         beta=d.beta, anchor=d.mdpo_anchor, cond_weight=d.mdpo_cond_weight,
                         anchor_weight=d.mdpo_anchor_weight)

    def compute_loss(self, batch, num_items):
        enc = batch.encode(self.adapter)                 # once: policy rows and (shared) reference
        lp = completion_logps(self.adapter, batch, enc, share_prefix=self.cfg.prefix_sharing)
        q = self.quantities(batch, lp)
        rq = self.reference_quantities(batch, enc) if self.needs_ref else None
        losses, stats = self.losses(batch, q, rq)
        sums = {"loss": losses.detach().sum(), "logps_chosen": q["chosen"].detach().sum(),
                "logps_rejected": q["rejected"].detach().sum(),
                "items": torch.tensor(float(batch.size), device=losses.device)}
        sums.update({k: v.sum() for k, v in stats.items()})
        return losses.sum() / num_items, sums


# ----------------------------------------------------------------------------- setup helpers
def disable_dropout(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def same_encoder(policy, ref, model_cfg, lora_cfg) -> bool:
    """True when the policy's image features can serve the reference: vision tower and projector
    frozen in the policy (no LoRA on them) and equal, tensor by tensor, to the reference's."""
    if model_cfg.train_vision or model_cfg.train_projector or (lora_cfg.enabled and lora_cfg.include_vision):
        return False
    if policy is ref:
        return True
    pg, rg = policy.param_groups(), ref.param_groups()
    for g in ("vision", "projector"):
        a, b = dict(pg[g]), dict(rg[g])
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k].to(a[k].device))
                                       for k in a):
            return False
    return True


def method_section(cfg):
    """The method's section of a config of this family: ``cfg.dpo`` (DPOConfig) or ``cfg.kto``."""
    return cfg.dpo if hasattr(cfg, "dpo") else cfg.kto


def build_reference(cfg: DPOConfig, adapter, peft_model, copy_ref=None):
    """(Reference or None, separate reference adapter or None) for the config (a DPOConfig or a
    KTOConfig): the LoRA-disabled policy, ``copy_ref`` (a copy of the starting policy taken
    before training), or ``ref.path``."""
    if getattr(method_section(cfg), "loss", None) in REFERENCE_FREE_LOSSES:
        return None, None
    if copy_ref is not None:
        return _frozen(copy_ref, cfg, adapter), copy_ref
    if cfg.lora.enabled and not cfg.ref.path:
        share = same_encoder(adapter, adapter, cfg.model, cfg.lora)
        return Reference(adapter, context=peft_model.disable_adapter, share_features=share, kind="lora"), None
    if not cfg.ref.path:
        raise VlmalignError("no reference: set ref.path, enable LoRA, or pass a copy of the starting policy")
    from ..errors import ModelError
    from ..models import load_adapter
    from .common import resolve_dtype
    ref_ad = load_adapter(cfg.ref.path, trust_remote_code=cfg.model.trust_remote_code,
                          dtype=resolve_dtype(cfg.model.dtype))
    if ref_ad.family != adapter.family or ref_ad.tokenizer.get_vocab() != adapter.tokenizer.get_vocab():
        raise ModelError(f"ref.path {cfg.ref.path!r}: the reference must be the policy's family with the same "
                         f"tokenizer (got {ref_ad.family} vs {adapter.family}, or a different vocabulary)")
    return _frozen(ref_ad, cfg, adapter), ref_ad


def _frozen(ref_ad, cfg, adapter) -> Reference:
    ref_ad.model.eval()
    ref_ad.model.requires_grad_(False)
    if method_section(cfg).disable_dropout:
        disable_dropout(ref_ad.model)
    return Reference(ref_ad, share_features=same_encoder(adapter, ref_ad, cfg.model, cfg.lora), kind="model")


def load_pairs(path, cfg: DPOConfig, adapter, corruption=None, limit=None):
    """Preference records of ``path`` tokenized for training (indexed) and their image loader."""
    holder = {}

    def tok(rec, imgs):
        return tokenize_pair(adapter, rec, imgs, max_length=cfg.data.max_length, loader=holder["loader"],
                             corruption=corruption)

    from .common import image_loader
    holder["loader"] = image_loader(adapter, cfg.data, path)
    examples, loader, _ = load_examples(path, cfg.data, adapter, tok, kind="preference", limit=limit)
    return index_examples(examples), loader


def make_evaluator(method_for_eval, examples, collate, batch_size):
    """Held-out loss, reward accuracy, rewards and margin (means over pairs)."""

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
        return {k: v / max(n, 1) for k, v in tot.items()}

    return evaluate


def train_dpo(cfg: DPOConfig, adapter=None) -> tuple[TrainResult, object]:
    """Train with the configured preference loss. Returns the result and the trained adapter."""
    d = cfg.dpo
    _validate(d)
    seed_everything(cfg.train.seed)
    if not cfg.data.train_file:
        raise VlmalignError("data.train_file is required")
    adapter = adapter or build_adapter(cfg.model, seed=cfg.train.seed, lora_cfg=cfg.lora)
    if d.loss == "listwise":  # ranked lists (methods/listwise.py)
        from .listwise import ListwiseMethod, load_listwise
        examples, collate, eval_examples, ecollate, parts = load_listwise(cfg, adapter)
        return fit(cfg, adapter, ListwiseMethod, examples, collate, eval_examples, ecollate, cache_parts=parts)
    corruption = corruption_of(d, cfg.train.seed)
    examples, loader = load_pairs(cfg.data.train_file, cfg, adapter, corruption, cfg.data.max_train_samples)
    eval_examples, eval_loader = ([], None)
    if cfg.data.eval_file:
        eval_examples, eval_loader = load_pairs(cfg.data.eval_file, cfg, adapter, corruption,
                                               cfg.data.max_eval_samples)
    pad_id = adapter.tokenizer.pad_token_id
    collate = PreferenceCollator(loader, pad_id, corruption)
    ecollate = PreferenceCollator(eval_loader, pad_id, corruption) if eval_examples else None
    parts = {"rows": list(ROWS + ((CORRUPT_ROW,) if corruption else ())),
             "token_weights": [d.token_weight_gamma, d.token_weight_normalize] if d.loss == "token_weighted" else None,
             "corruption": corruption.key() if corruption else None}
    return fit(cfg, adapter, DPOMethod, examples, collate, eval_examples, ecollate,
               needs_ref=d.loss not in REFERENCE_FREE_LOSSES, cache_parts=parts)


def fit(cfg, adapter, method_cls, examples, collate, eval_examples=(), ecollate=None, *, needs_ref: bool = True,
        cache_parts: dict | None = None, trainer_cls=Trainer, finish_eval=None) -> tuple[TrainResult, object]:
    """The run every reference-based method of this family shares once its data is tokenized
    (DPO losses, listwise DPO, KTO): trainable parts, the reference (``build_reference``), the
    trainer, and with ``precompute_ref_logps`` the cached reference values (``cache_parts``: what
    the loss's quantities depend on, part of the cache key). ``method_cls(adapter, section,
    ref=)`` is the step function; ``finish_eval`` post-processes evaluation means."""
    from . import ref_cache
    d = method_section(cfg)
    copy_ref = None
    if needs_ref and not cfg.ref.path and not cfg.lora.enabled:
        copy_ref = type(adapter)(copy.deepcopy(adapter.model), adapter.processor)  # frozen starting policy
    lora_base_fp = None
    if needs_ref and d.precompute_ref_logps and cfg.lora.enabled and not cfg.ref.path:
        lora_base_fp = ref_cache.module_fingerprint(adapter.model.state_dict().items())
    model, projector, vision = prepare_trainable(adapter, cfg)
    if d.disable_dropout:
        disable_dropout(model)
    reference, ref_ad = build_reference(cfg, adapter, model, copy_ref) if needs_ref else (None, None)
    if reference is not None:
        print(reference.describe())
    why = prefix_sharing_problem(adapter) if d.prefix_sharing else \
        ("dpo" if hasattr(cfg, "dpo") else "kto") + ".prefix_sharing=false"
    print("prefix sharing: " + ("on" if why is None else f"off ({why})"))
    method = method_cls(adapter, d, ref=reference)
    eval_method = method_cls(adapter, d, ref=reference) if eval_examples else None
    evaluate = None
    if eval_examples:
        evaluate = make_evaluator(eval_method, eval_examples, ecollate, cfg.train.batch_size)
        if finish_eval is not None:
            evaluate = (lambda ev: lambda step: finish_eval(ev(step)))(evaluate)
    trainer = trainer_cls(method=method, model=model, processor=adapter.processor, examples=examples,
                          collate=collate, train_cfg=cfg.train, optim_cfg=cfg.optim, config=cfg, evaluate=evaluate,
                          adapters=[adapter], projector_names=projector, vision_names=vision)
    if ref_ad is not None:
        ref_ad.model.to(trainer.acc.device)
    if needs_ref and d.precompute_ref_logps:
        fp = lora_base_fp or ref_cache.module_fingerprint(ref_ad.model.state_dict().items())
        plain = trainer.acc.unwrap_model(trainer.runner)
        for m, exs, col, f in ((method, examples, collate, cfg.data.train_file),
                               (eval_method, eval_examples, ecollate, cfg.data.eval_file)):
            if m is None:
                continue
            m.ref_values = _precomputed(cfg, m, exs, col, f, fp, adapter, trainer, plain, cache_parts)
        for m in (method, eval_method):
            if m is not None:
                m.ref = None
        del reference, ref_ad, copy_ref  # the reference model is no longer needed
    return trainer.train(), adapter


def _precomputed(cfg, method, examples, collate, data_file, ref_fp, adapter, trainer, plain, loss_parts):
    """The reference values of ``examples``: loaded from the cache, or computed once and stored."""
    from . import ref_cache
    from .common import data_root
    d = method_section(cfg)
    ref_model = method.ref.adapter.model
    parts = ref_cache.key_parts(
        data_file=data_file, data_cfg=cfg.data, image_root=data_root(cfg.data, data_file), examples=examples,
        adapter=adapter,
        reference={"weights": ref_fp, "kind": method.ref.kind, "dtype": str(next(ref_model.parameters()).dtype),
                   "precision": trainer.acc.mixed_precision},
        loss=loss_parts)
    cache = ref_cache.RefLogpsCache(d.ref_cache_dir or ref_cache.default_cache_dir(), parts)

    def compute():
        runner = adapter.runner
        adapter.runner = plain                # no DDP collectives while one process computes
        was = adapter.model.training
        adapter.model.eval()
        try:
            with trainer.acc.autocast():
                return ref_cache.compute_values(method, examples, collate, cfg.train.batch_size,
                                                trainer.acc.device)
        finally:
            adapter.runner = runner
            if was:
                adapter.model.train()

    values = ref_cache.load_or_compute(cache, len(examples), compute, main_process=trainer.acc.is_main_process,
                                       barrier=trainer.acc.wait_for_everyone)
    return {k: v.to(trainer.acc.device) for k, v in values.items()}
