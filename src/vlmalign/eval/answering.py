"""Asking a model: batched generation, or likelihood ranking of the options.

Batches never split a group (an MMBench question's rotations, an MME image's two questions)
unless the group alone is larger than a batch, and each batch's unique images are encoded once
(:func:`vlmalign.data.batching.unique_images`): in both modes every image is encoded once per
question however many rotations or options it has.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..data.batching import Example, ImageLoader, image_prompts, pad, unique_images
from ..data.schema import Message
from ..errors import DataError
from ..losses.logps import token_logps
from ..rollout.generate import SamplingConfig, generate_batch
from .items import EvalItem


def batches(items: Sequence[EvalItem], size: int) -> Iterator[list[EvalItem]]:
    """Consecutive items in batches of about ``size`` that keep each group together."""
    batch: list[EvalItem] = []
    i = 0
    while i < len(items):
        j = i + 1
        key = items[i].group
        while key is not None and j < len(items) and items[j].group == key:
            j += 1
        group = list(items[i:j])
        if batch and len(batch) + len(group) > size:
            yield batch
            batch = []
        batch.extend(group)
        i = j
    if batch:
        yield batch


def messages(item: EvalItem, text: str, position: str = "before") -> list[Message]:
    """The question as one user turn, its images ``before`` or ``after`` the text."""
    return [Message.user(*item.images, text) if position == "before" else Message.user(text, *item.images)]


def _located(e: DataError, item: EvalItem) -> DataError:
    return e.located(file=item.source, index=item.index)


def generate_answers(adapter, items: Sequence[EvalItem], prompts: Sequence[str], loader: ImageLoader,
                     cfg: SamplingConfig, position: str = "before") -> list[str]:
    """One greedy (or sampled, per ``cfg``) answer per item, one batch."""
    msgs = []
    for it, p in zip(items, prompts):
        m = messages(it, p, position)
        for ref in it.images:      # a missing or corrupt image names its item before generating
            try:
                loader.inputs(ref)
            except DataError as e:
                raise _located(e, it) from None
        msgs.append(m)
    return [o[0] for o in generate_batch(adapter, msgs, loader, cfg)]


@torch.no_grad()
def rank_options(adapter, items: Sequence[EvalItem], prompts: Sequence[str], loader: ImageLoader, *,
                 norm: str = "mean", position: str = "before") -> list[dict[str, float]]:
    """Per item, the log-probability of each option's text as the answer (``norm``: ``sum`` over
    its tokens, or their ``mean``, which does not favour short options). One forward pass per
    batch: a row per (item, option), each image encoded once for all of them."""
    tok = adapter.tokenizer
    stops = set(adapter.stop_token_ids())
    examples, owners = [], []
    for n, (it, p) in enumerate(zip(items, prompts)):
        try:
            imgs = [loader.inputs(r) for r in it.images]
        except DataError as e:
            raise _located(e, it) from None
        msgs = messages(it, p, position)
        eps = image_prompts(msgs, adapter)
        for letter, text in (it.options or {}).items():
            p_ids, c_ids, _ = adapter.tokenize_completion(msgs, str(text), imgs)
            while c_ids and c_ids[-1] in stops:   # the option's own tokens, not the end of turn
                c_ids = c_ids[:-1]
            if not c_ids:
                raise DataError(f"option {letter} has no tokens", file=it.source, index=it.index, field=letter)
            examples.append(Example(rows={"prompt": p_ids, "completion": c_ids}, images=list(it.images),
                                    image_prompts=eps))
            owners.append((n, letter))
    uniq, per, uprompts = unique_images(examples, loader)
    dev = adapter.device
    seqs = [e.rows["prompt"] + e.rows["completion"] for e in examples]
    ids = pad(seqs, tok.pad_token_id).to(dev)
    mask = pad([[1] * len(s) for s in seqs], 0).to(dev)
    # position t predicts token t+1: keep only positions that predict an option token
    want = torch.zeros(ids.shape, dtype=torch.bool)
    for r, e in enumerate(examples):
        start = len(e.rows["prompt"])
        want[r, start - 1:start - 1 + len(e.rows["completion"])] = True
    pos = torch.nonzero(want.any(dim=0)).squeeze(-1)
    enc = adapter.encode_images(uniq, prompts=uprompts) if uniq else None
    was = adapter.model.training
    adapter.model.eval()
    out = adapter.forward(ids, mask, encoded=enc, image_indices=per, logits_to_keep=pos.to(dev), use_cache=False)
    if was:
        adapter.model.train()
    keep = want[:, pos].to(dev)
    lp = token_logps(out.logits, ids[:, pos + 1]) * keep      # on the model's device: no logits copy
    totals = lp.sum(-1).cpu()
    counts = keep.sum(-1).cpu()
    scores: list[dict[str, float]] = [{} for _ in items]
    for r, (n, letter) in enumerate(owners):
        v = totals[r].item()
        scores[n][letter] = v / counts[r].item() if norm == "mean" else v
    return scores


def best_option(scores: dict[str, float]) -> str:
    """The highest-scoring letter (the first in option order on a tie)."""
    return max(scores, key=lambda k: scores[k])
