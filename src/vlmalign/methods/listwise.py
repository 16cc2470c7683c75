"""Listwise DPO on ranked lists: ``vlmalign train dpo dpo.loss=listwise`` with a file of ranked
lists (K candidates per prompt, best first; lists may differ in length).

The loss is the Plackett-Luce model on DPO's implicit rewards ``beta (policy - ref)``
(``losses.preference.listwise_dpo_loss``); with K = 2 it is DPO's sigmoid loss. Per record the
prompt and its images are shared by all K candidate rows (``data/completions.py``): images are
encoded once per step for every candidate, policy and reference, and each prompt runs once
where prefix sharing is exact. Everything else (reference, cache, trainer) is
``methods.preference.fit``.
"""

from __future__ import annotations

import torch

from ..data.completions import RankedCollator, num_candidates, tokenize_ranked
from ..data.preference import index_examples
from ..losses.preference import listwise_dpo_loss
from ..data.loading import load_examples, load_splits
from ..config import validate_config
from ..errors import VlmalignError
from .logps import completion_logps
from .preference import PreferenceMethod


class ListwiseMethod(PreferenceMethod):
    """One micro-batch of listwise DPO on a :class:`~vlmalign.data.completions.RankedBatch`.
    Quantities (and cached reference values) are ``cand_0`` ... ``cand_{K-1}``: (B,) summed
    completion log-probs per rank, 0 past the end of a shorter list."""

    def __init__(self, adapter, cfg, ref=None, ref_values: dict | None = None):
        cfg = getattr(cfg, "dpo", cfg)  # a DPOConfig or its dpo section
        validate_config(cfg, "dpo.")
        if cfg.loss != "listwise":
            raise VlmalignError("dpo.loss=listwise is computed by methods.listwise.ListwiseMethod on ranked lists, "
                                "the other losses by DPOMethod on pairs")
        super().__init__(adapter, cfg, ref, ref_values)
        if ref is None and ref_values is None:
            raise VlmalignError("dpo.loss=listwise needs a reference (model or precomputed values)")

    def quantities(self, batch, token_lp: torch.Tensor) -> dict[str, torch.Tensor]:
        per_list = batch.candidates(token_lp.sum(1))                  # (B, K)
        return {f"cand_{k}": per_list[:, k] for k in range(per_list.shape[1])}

    @staticmethod
    def _matrix(q: dict) -> torch.Tensor:
        return torch.stack([q[f"cand_{k}"] for k in range(len(q))], dim=1)   # (B, K)

    def compute_loss(self, batch, num_items):
        enc = batch.encode(self.adapter)                 # once: every candidate, policy and reference
        lp = completion_logps(self.adapter, batch, enc, share_prefix=self.cfg.prefix_sharing)
        pol = self._matrix(self.quantities(batch, lp))
        ref = self._matrix(self.reference_quantities(batch, enc))
        losses, stats = listwise_dpo_loss(pol, ref, batch.candidate_mask, beta=self.cfg.beta)
        sums = {"loss": losses.detach().sum(), "logps_best": pol[:, 0].detach().sum(),
                "items": torch.tensor(float(batch.size), device=losses.device)}
        sums.update({k: v.sum() for k, v in stats.items()})
        return losses.sum() / num_items, sums


def _load(path, cfg, adapter, limit):
    def tok(rec, imgs):
        return tokenize_ranked(adapter, rec, imgs, max_length=cfg.data.max_length)

    examples, loader, _ = load_examples(path, cfg.data, adapter, tok, kind="ranked", limit=limit)
    return index_examples(examples), loader


def load_listwise(cfg, adapter):
    """(train examples, collator, eval examples, eval collator, cache key parts) of a DPOConfig
    with ``dpo.loss=listwise``. Files are read as ranked lists (preference pairs count as lists
    of two)."""
    pad_id = adapter.tokenizer.pad_token_id
    examples, loader, eval_examples, eval_loader = load_splits(
        cfg.data, lambda path, limit: _load(path, cfg, adapter, limit))
    k = max(num_candidates(ex) for ex in examples) if examples else 2
    collate = RankedCollator(loader, pad_id, k)
    ecollate = RankedCollator(eval_loader, pad_id, max(num_candidates(ex) for ex in eval_examples)) \
        if eval_examples else None
    return examples, collate, eval_examples, ecollate, {"rows": ["listwise"]}
