"""How a reward model reads records: each record's candidate responses, their token rows, the
batches that score them, and :func:`score_records`.

A record is a prompt (with its images) and one or more candidate responses, best first
(:func:`candidates`): preference pairs give two (the rejected side may use other images),
ranked lists K, unpaired examples and conversations one (for scoring only). All candidates of
a record go into the same batch and share its images, encoded once per batch. Reward-model
training (:mod:`vlmalign.methods.rm`), ``vlmalign score`` and the reward-model source of
online RL (:class:`vlmalign.rewards.RewardModelSource`) all use these.
"""

from __future__ import annotations

import logging
import math

import torch

from ..data.batching import Batch, pad, unique_images
from ..data.schema import Conversation, PreferencePair, RankedList, UnpairedExample
from ..errors import DataError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- records -> candidates
def candidates(rec) -> list[tuple[str, list, str, list | None]]:
    """(label, prompt messages, response, other images or None) per candidate, best first.

    Preference pairs and ranked lists give two or more; unpaired examples and conversations
    (their last assistant turn) give one, for scoring only."""
    if isinstance(rec, PreferencePair):
        return [("chosen", rec.prompt, rec.chosen, None),
                ("rejected", rec.prompt, rec.rejected, rec.rejected_images)]
    if isinstance(rec, RankedList):
        return [(f"responses[{k}]", rec.prompt, r, None) for k, r in enumerate(rec.responses)]
    if isinstance(rec, UnpairedExample):
        return [("completion", rec.prompt, rec.completion, None)]
    if isinstance(rec, Conversation):
        last = max((i for i, m in enumerate(rec.messages) if m.role == "assistant"), default=None)
        if not last:
            raise rec.error("no assistant turn after a prompt to score", "messages")
        return [(f"messages[{last}]", rec.messages[:last], rec.messages[last].text, None)]
    raise rec.error(f"a {rec.kind} record has no response to score", "kind")


def _margins(rec, wanted: bool) -> list[float] | None:
    """Per-candidate numbers whose differences are the pair margins (None: not used)."""
    if not wanted:
        return None
    if isinstance(rec, RankedList) and rec.scores is not None:
        return list(rec.scores)
    m = rec.meta.get("margin") if isinstance(rec, PreferencePair) else None
    if isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m):
        return [float(m), 0.0]
    raise rec.error("rm.margin=true needs per-response scores (ranked lists) or a numeric margin (pairs)",
                    "scores" if isinstance(rec, RankedList) else "margin")


def make_tokenizer(adapter, loader, max_length, *, train: bool, margin: bool = False):
    """``tokenize(record, image_inputs) -> rows`` for :func:`vlmalign.data.batching.prepare`.

    rows: ``candidates`` (token ids per candidate: prompt + response ending with its end-of-turn
    token, where the score is read), ``image_slots`` (per candidate, indices into the example's
    images) and ``scores`` (margins)."""
    def tokenize(rec, imgs):
        if train and not isinstance(rec, (PreferencePair, RankedList)):
            raise rec.error(f"{rec.kind} records cannot train a reward model: use preference pairs or "
                            "ranked lists", "kind")
        cands, slots = [], []
        n_prompt = len(imgs)
        extra = 0
        for label, prompt, response, other in candidates(rec):
            ims = imgs
            slot = list(range(n_prompt))
            if other is not None:
                ims = [loader.inputs(r) for r in other]
                slot = list(range(n_prompt + extra, n_prompt + extra + len(other)))
                extra += len(other)
            try:
                p, c, _ = adapter.tokenize_completion(prompt, response, ims, max_length=max_length)
            except DataError as e:
                raise e.located(field=label) from None
            cands.append(p + c)
            slots.append(slot)
        return {"candidates": cands, "image_slots": slots, "scores": _margins(rec, margin)}
    return tokenize


def add_rejected_images(examples) -> None:
    """Rejected-side images (mDPO-style pairs) join the record's images after the prompt's."""
    for ex in examples:
        other = getattr(ex.record, "rejected_images", None)
        if other:
            ex.images = ex.images + list(other)
            ex.image_prompts = (ex.image_prompts or [None] * len(other)) * 2


class RMCollator:
    """Examples -> one batch: every candidate of every record is a row; images are unique per
    batch and shared by all rows that use them. ``side`` pads right (training) or left."""

    def __init__(self, loader, pad_id: int, side: str = "right"):
        self.loader = loader
        self.pad_id = pad_id
        self.side = side

    def __call__(self, examples) -> Batch:
        uniq, per_ex, prompts = unique_images(examples, self.loader)
        ids, indices, slots, better, worse, owner, margin = [], [], [], [], [], [], []
        kmax = max(len(ex.rows["candidates"]) for ex in examples)
        for e, ex in enumerate(examples):
            rows = []
            for cand, sl in zip(ex.rows["candidates"], ex.rows["image_slots"]):
                rows.append(len(ids))
                ids.append(cand)
                indices.append([per_ex[e][s] for s in sl])
            sc = ex.rows.get("scores")
            for i in range(len(rows)):
                for j in range(i + 1, len(rows)):
                    better.append(rows[i])
                    worse.append(rows[j])
                    owner.append(e)
                    margin.append(sc[i] - sc[j] if sc is not None else float("nan"))
            slots.append(rows + [-1] * (kmax - len(rows)))
        tensors = {
            "input_ids": pad(ids, self.pad_id, self.side),
            "attention_mask": pad([[1] * len(s) for s in ids], 0, self.side),
            "slots": torch.tensor(slots, dtype=torch.long),            # (E, K) row of each candidate
            "pair_better": torch.tensor(better, dtype=torch.long),     # (P,) rows
            "pair_worse": torch.tensor(worse, dtype=torch.long),       # (P,)
            "pair_owner": torch.tensor(owner, dtype=torch.long),       # (P,) example of each pair
            "pair_margin": torch.tensor(margin, dtype=torch.float32),  # (P,) score differences
        }
        return Batch(tensors, uniq, indices, len(examples), prompts)


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_records(model, records, loader, *, batch_size: int = 16, max_length: int | None = None,
                  on_error: str = "raise"):
    """Score every (image, prompt, response) of ``records``; yields one dict per candidate."""
    from ..data.batching import prepare
    tok = make_tokenizer(model.adapter, loader, max_length, train=False)
    examples, rep = prepare(records, tok, loader, on_error=on_error)
    if rep.count:
        log.warning(rep.summary())
    add_rejected_images(examples)
    collate = RMCollator(loader, model.adapter.tokenizer.pad_token_id)
    model.eval()
    dev = model.adapter.device
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        b = collate(chunk).to(dev)
        s = model.score(b).float().cpu().tolist()
        slots = b.tensors["slots"].tolist()
        for ex, sl in zip(chunk, slots):
            rec = ex.record
            for k, (label, prompt, response, other) in enumerate(candidates(rec)):
                imgs = other if other is not None else rec.images
                user = [m for m in prompt if m.role == "user"]
                yield {"id": rec.id, "index": rec.index, "candidate": label, "rank": k,
                       "prompt": user[-1].text if user else "", "images": [im.to_json() for im in imgs],
                       "response": response, "score": s[sl[k]]}
