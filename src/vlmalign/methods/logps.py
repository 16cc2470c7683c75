"""Per-token log-probs of completions, for the DPO family.

Two ways to compute the same numbers for a :class:`~vlmalign.data.preference.PreferenceBatch`:

* **unshared**: every row is a whole sequence (prompt + completion); one forward over R rows.
  Only positions that predict a completion token build logits.
* **prefix-shared**: each distinct prompt (which holds the image tokens, usually most of the
  sequence) runs once, minus its last token; its key/value cache is indexed out to the rows that
  continue it (chosen, rejected, ...) and each row runs ``[last prompt token] + completion[:-1]``
  on top, with explicit position ids. Gradients flow through the cache, so loss and gradients
  equal the unshared ones (up to float rounding). The last prompt token is moved into the
  continuation so that every completion logit comes from the continuation forward.

Prefix sharing is used only where it is exact: the adapter allows it (``prefix_sharing``: not
for M-RoPE or prefix-LM families), the model returns a plain dynamic key/value cache (no sliding
window layers), activation checkpointing is off, and, for forwards with gradients, the model is
not sharded with FSDP2. Otherwise the unshared path runs and the
reason is logged once.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from ..engine.sharding import is_sharded
from ..losses.logps import token_logps
from ..models.adapter import PrefixNotShared

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _note(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def prefix_sharing_problem(adapter) -> str | None:
    """Why prefix sharing cannot be used with this adapter/model (None: it can)."""
    why = adapter.prefix_sharing_problem()
    if why is None and torch.is_grad_enabled() and is_sharded(adapter.runner):
        # the prompt's keys and values reach the loss through the cache, around the layers' outputs,
        # on which FSDP2's backward hooks gather the parameters again: backward would find them freed
        return "the model is sharded with FSDP2 (gradients through the key/value cache pass FSDP's backward hooks)"
    return why


def unshared_logps(adapter, batch, encoded) -> torch.Tensor:
    """(R, Lc) log-probs of each row's completion tokens (0 where ``completion_mask`` is off)."""
    t = batch.tensors
    ids, mask = t["input_ids"], t["attention_mask"]
    comp, cmask = t["completion_ids"], t["completion_mask"]
    plen = t["row_prompt_lens"]                                   # (R,)
    R, Lc = comp.shape
    clen = cmask.sum(1)
    # logit at position p_r - 1 + j predicts completion token j of row r
    start = int(plen.min()) - 1
    end = int((plen + clen).max()) - 1
    pos = torch.arange(start, end, device=ids.device)             # (W,)
    out = adapter.forward(ids, mask, encoded=encoded, image_indices=batch.row_image_indices(),
                          logits_to_keep=pos, use_cache=False)
    logits = out.logits                                           # (R, W, V)
    j = torch.arange(Lc, device=ids.device)
    idx = (plen.unsqueeze(1) - 1 + j - start).clamp(0, logits.shape[1] - 1)   # (R, Lc)
    rows = torch.arange(R, device=ids.device).unsqueeze(1)
    sel = logits[rows, idx]                                       # (R, Lc, V)
    lp = token_logps(sel, comp)
    return lp.masked_fill(~cmask, 0.0)


def shared_logps(adapter, batch, encoded) -> torch.Tensor:
    """As :func:`unshared_logps`, running each distinct prompt once (raises PrefixNotShared where the
    batch or the model's cache does not allow it)."""
    t = batch.tensors
    pids, plens = t["prompt_ids"], t["prompt_lens"]               # (P, Lp), (P,), right-padded
    comp, cmask, rp = t["completion_ids"], t["completion_mask"], t["row_prompt"]
    P, Lp = pids.shape
    R, Lc = comp.shape
    dev = pids.device
    last = pids[torch.arange(P, device=dev), plens - 1]           # (P,)
    pmask = (torch.arange(Lp - 1, device=dev).unsqueeze(0) < (plens - 1).unsqueeze(1)).long()   # (P, Lp-1)
    cache = adapter.prompt_cache(pids[:, :Lp - 1], pmask, rp, last, encoded=encoded,
                                 image_indices=batch.image_indices)
    cont = torch.cat([last[rp].unsqueeze(1), comp[:, :-1]], dim=1)                    # (R, Lc)
    cont_mask = torch.cat([torch.ones(R, 1, dtype=torch.long, device=dev), cmask[:, :-1].long()], dim=1)
    full_mask = torch.cat([pmask[rp], cont_mask], dim=1)                             # (R, Lp-1+Lc)
    pos = (plens[rp] - 1).unsqueeze(1) + torch.arange(Lc, device=dev).unsqueeze(0)   # (R, Lc)
    out2 = adapter.forward(cont, full_mask, cache=cache, position_ids=pos, use_cache=True)
    lp = token_logps(out2.logits, comp)
    return lp.masked_fill(~cmask, 0.0)


def completion_logps(adapter, batch, encoded, *, share_prefix: bool) -> torch.Tensor:
    """(R, Lc) per-token completion log-probs; prefix-shared where asked and exact."""
    if share_prefix:
        why = prefix_sharing_problem(adapter)
        if why is None:
            try:
                return shared_logps(adapter, batch, encoded)
            except PrefixNotShared as e:
                _note(f"prefix sharing skipped for a batch: {e}; using the unshared forward")
        else:
            _note(f"prefix sharing off: {why}; using the unshared forward")
    return unshared_logps(adapter, batch, encoded)


class Reference:
    """Where the reference log-probs come from.

    ``adapter``: the adapter whose forward computes them (the policy's own under LoRA, where
    ``context`` disables the adapters, or a separate frozen model's). ``share_features``: the
    policy's image features are also the reference's (vision tower and projector frozen and
    identical), so images are not encoded again; otherwise the reference encodes them itself.
    """

    def __init__(self, adapter, *, context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 share_features: bool = True, kind: str = "model"):
        self.adapter = adapter
        self.context = context or contextlib.nullcontext
        self.share_features = share_features
        self.kind = kind

    @torch.no_grad()
    def token_logps(self, batch, policy_encoded, *, share_prefix: bool) -> torch.Tensor:
        with self.context():
            enc = policy_encoded if self.share_features else batch.encode(self.adapter)
            return completion_logps(self.adapter, batch, enc, share_prefix=share_prefix)

    def describe(self) -> str:
        what = {"lora": "the policy with its LoRA adapters disabled", "model": "a separate frozen model"}
        feats = "shares the policy's image features" if self.share_features else "encodes images itself"
        return f"reference: {what.get(self.kind, self.kind)}; {feats}"
