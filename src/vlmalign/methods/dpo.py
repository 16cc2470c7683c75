"""The DPO family on vision-language models: DPO (sigmoid), cDPO, IPO, hinge, SimPO, ORPO,
token-weighted DPO (RLHF-V's dense DPO), mDPO, and listwise DPO on ranked lists
(``methods/listwise.py``). The run is the offline preference loop of ``methods/preference.py``,
which KTO (``methods/kto.py``) shares.

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

import logging
from dataclasses import dataclass

import torch

from ..config import opt, section, validate_config
from ..config.sections import DataSection, PreferenceOptim, TrainSection
from ..data.preference import CORRUPT_ROW, ROWS, Corruption, PreferenceCollator, index_examples, tokenize_pair
from ..engine.trainer import TrainResult
from ..errors import VlmalignError
from ..losses.preference import REFERENCE_FREE_LOSSES, changed_token_weights, dpo_loss, mdpo_loss, \
    orpo_loss, preference_loss, simpo_loss, token_weighted_logps, with_chosen_nll
from ..data.loading import load_examples, load_splits
from .setup import start_run
from .logps import Reference, completion_logps
from .preference import PreferenceMethod, fit
from .reference import PolicyConfig
from .registry import Method

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
    rpo_alpha: float = opt(0.0, "RPO: add this times the chosen completion's per-token NLL to the loss "
                                "(0: off; not with orpo, which has its own)", ge=0)
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

    def check(self) -> None:
        if self.loss == "cdpo" and not self.label_smoothing > 0:
            raise VlmalignError("dpo.loss=cdpo needs dpo.label_smoothing in (0, 0.5]")
        if self.label_smoothing and self.loss not in ("sigmoid", "cdpo", "token_weighted"):
            raise VlmalignError(f"dpo.label_smoothing applies to sigmoid/cdpo/token_weighted, not {self.loss}")
        if self.rpo_alpha and self.loss in ("orpo", "listwise"):
            raise VlmalignError(f"dpo.rpo_alpha does not apply to dpo.loss={self.loss}"
                                + (" (ORPO has its own NLL term)" if self.loss == "orpo" else ""))


@dataclass
class DPOConfig(PolicyConfig):
    data: DataSection = section(DataSection, "preference pairs: training and held-out files")
    optim: PreferenceOptim = section(PreferenceOptim, "optimizer and learning-rate schedule")
    train: TrainSection = section(TrainSection, "loop, batch sizes (in pairs), precision, checkpoints")
    dpo: DPOSection = section(DPOSection, "loss and the reference / caching / sharing options")


def corruption_of(d: DPOSection, seed: int) -> Corruption | None:
    if d.loss != "mdpo":
        return None
    return Corruption(kind=d.mdpo_corruption, keep=d.mdpo_keep, noise_std=d.mdpo_noise_std, seed=seed)


class DPOMethod(PreferenceMethod):
    """One micro-batch of the configured pairwise preference loss (``compute_loss(batch,
    num_items)``). ``ref``: a :class:`~vlmalign.methods.logps.Reference` (None for reference-free
    losses or when ``ref_values`` holds precomputed values: name -> (N,) tensor indexed by example
    position). ``dpo.loss=listwise`` is :class:`~.listwise.ListwiseMethod`'s, on ranked lists."""

    def __init__(self, adapter, cfg, ref: Reference | None = None, ref_values: dict | None = None):
        cfg = getattr(cfg, "dpo", cfg)  # a DPOConfig or its dpo section
        validate_config(cfg, "dpo.")
        if cfg.loss == "listwise":
            raise VlmalignError("dpo.loss=listwise is computed by methods.listwise.ListwiseMethod on ranked lists, "
                                "the other losses by DPOMethod on pairs")
        super().__init__(adapter, cfg, ref, ref_values)
        self.needs_ref = cfg.loss not in REFERENCE_FREE_LOSSES
        if self.needs_ref and ref is None and ref_values is None:
            raise VlmalignError(f"dpo.loss={cfg.loss} needs a reference (model or precomputed values)")

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

    # ----------------------------------------------------------------- the loss
    def losses(self, batch, q: dict, rq: dict | None):
        losses, stats = self.preference_losses(batch, q, rq)
        if not self.cfg.rpo_alpha:
            return losses, stats
        n = batch.tensors["completion_mask"].sum(1).to(q["chosen"].dtype)
        return with_chosen_nll(losses, stats, -q["chosen"] / batch.group(n, "chosen"), self.cfg.rpo_alpha)

    def preference_losses(self, batch, q: dict, rq: dict | None):
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


def load_pairs(path, cfg: DPOConfig, adapter, corruption=None, limit=None):
    """Preference records of ``path`` tokenized for training (indexed) and their image loader."""
    holder = {}

    def tok(rec, imgs):
        return tokenize_pair(adapter, rec, imgs, max_length=cfg.data.max_length, loader=holder["loader"],
                             corruption=corruption)

    from ..data.loading import image_loader
    holder["loader"] = image_loader(adapter, cfg.data, path)
    examples, loader, _ = load_examples(path, cfg.data, adapter, tok, kind="preference", limit=limit)
    return index_examples(examples), loader


def train_dpo(cfg: DPOConfig, adapter=None, callbacks=()) -> tuple[TrainResult, object]:
    """Train with the configured preference loss. Returns the result and the trained adapter."""
    d = cfg.dpo
    adapter = start_run(cfg, adapter)
    if d.loss == "listwise":  # ranked lists (methods/listwise.py)
        from .listwise import ListwiseMethod, load_listwise
        examples, collate, eval_examples, ecollate, parts = load_listwise(cfg, adapter)
        return fit(cfg, "dpo", adapter, ListwiseMethod, examples, collate, eval_examples, ecollate,
                   cache_parts=parts, callbacks=callbacks)
    corruption = corruption_of(d, cfg.train.seed)
    examples, loader, eval_examples, eval_loader = load_splits(
        cfg.data, lambda path, limit: load_pairs(path, cfg, adapter, corruption, limit))
    pad_id = adapter.tokenizer.pad_token_id
    collate = PreferenceCollator(loader, pad_id, corruption)
    ecollate = PreferenceCollator(eval_loader, pad_id, corruption) if eval_examples else None
    parts = {"rows": list(ROWS + ((CORRUPT_ROW,) if corruption else ())),
             "token_weights": [d.token_weight_gamma, d.token_weight_normalize] if d.loss == "token_weighted" else None,
             "corruption": corruption.key() if corruption else None}
    return fit(cfg, "dpo", adapter, DPOMethod, examples, collate, eval_examples, ecollate,
               needs_ref=d.loss not in REFERENCE_FREE_LOSSES, cache_parts=parts, callbacks=callbacks)


METHODS = (
    Method("dpo", "DPO family (sigmoid, cDPO, IPO, hinge, SimPO, ORPO, token-weighted, mDPO) on "
           "preference pairs; listwise DPO on ranked lists",
           DPOConfig, train_dpo),
)
