"""From schema records to model batches in which each image is encoded once.

Records are tokenized once up front (``prepare``), which also checks every record against the
model's length limit and the images on disk, so bad records stop training before it starts
(or are skipped, counted and reported under ``on_error="skip"``). Images are loaded and
preprocessed per batch, deduplicated by identity, and handed to the step function as one list
of unique images plus, for every row, the indices of the images its placeholders use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..constants import IGNORE_INDEX
from ..errors import DataError, LengthError
from .images import DEFAULT_MAX_PIXELS, check_image_root, check_max_pixels, load_image
from .schema import ImageRef

log = logging.getLogger(__name__)


@dataclass
class SkipReport:
    """What an explicit skip policy dropped: never silent."""

    skipped: list[DataError] = field(default_factory=list)
    total: int = 0

    @property
    def count(self) -> int:
        return len(self.skipped)

    def summary(self, limit: int = 5) -> str:
        lines = [f"skipped {self.count} of {self.total} records"]
        lines += [f"  {e}" for e in self.skipped[:limit]]
        if self.count > limit:
            lines.append(f"  ... and {self.count - limit} more")
        return "\n".join(lines)


@dataclass
class Example:
    """A tokenized record: one or more token rows sharing the record's images."""

    rows: dict[str, list[int]]          # e.g. {"input_ids", "labels"} or {"prompt", "chosen", ...}
    images: list[ImageRef]
    record: Any = None
    # per image: the text its encoding depends on (InstructBLIP's Q-Former instruction), or None
    image_prompts: list[str | None] | None = None


def image_prompts(messages, adapter) -> list[str | None]:
    """For each image of ``messages`` (in order), the adapter's encoding prompt (usually None)."""
    out = []
    for m in messages:
        for _ in m.images:
            out.append(adapter.image_prompt([m]))
    return out


class ImageLoader:
    """Load + preprocess images for an adapter; a small cache keyed by image identity.

    ``max_pixels``: the pixel budget of :func:`.images.load_image` (None: none of ours).
    A root that does not exist is refused here, once, rather than at every image.
    """

    def __init__(self, adapter, image_root: str | Path | None, cache_size: int = 4096, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        check_image_root(image_root)
        self.adapter = adapter
        self.image_root = image_root
        self.cache_size = cache_size
        self.max_pixels = check_max_pixels(max_pixels)
        self._cache: dict[str, Any] = {}

    def pil(self, ref: ImageRef):
        return load_image(ref, self.image_root, max_pixels=self.max_pixels)

    def inputs(self, ref: ImageRef):
        key = ref.key()
        hit = self._cache.get(key)
        if hit is None:
            img = self.pil(ref)
            try:
                hit = self.adapter.preprocess_image(img)
            except (ValueError, RuntimeError) as e:  # e.g. Qwen2-VL refuses aspect ratios > 200
                raise DataError(f"the model's processor cannot use image {ref.path or key} "
                                f"({type(e).__name__}: {e})", field="image") from None
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = hit
        return hit


def prepare(records: Sequence, tokenize: Callable[[Any, list], dict], loader: ImageLoader, *,
            on_error: str = "raise") -> tuple[list[Example], SkipReport]:
    """Tokenize every record (``tokenize(record, image_inputs) -> rows``) and check its images.

    ``on_error="raise"`` stops at the first bad record with its file, index and field;
    ``"skip"`` drops bad records and returns them in the SkipReport.
    """
    out, report = [], SkipReport(total=len(records))
    for rec in records:
        try:
            try:
                imgs = [loader.inputs(r) for r in rec.images]
                rows = tokenize(rec, imgs)
            except DataError as e:
                raise e.located(file=rec.source, index=rec.index) from None
        except DataError as e:
            if on_error == "raise":
                raise
            report.skipped.append(e)
            continue
        msgs = rec.messages if hasattr(rec, "messages") else rec.prompt
        out.append(Example(rows=rows, images=list(rec.images), record=rec,
                           image_prompts=image_prompts(msgs, loader.adapter)))
    if report.count:  # the caller reports it once, with what reading the file skipped
        log.debug(report.summary())
    return out, report


@dataclass
class Batch:
    """Padded token rows plus unique images and, per row, the image indices it uses."""

    tensors: dict[str, torch.Tensor]
    images: list                       # unique ImageInputs
    image_indices: list[list[int]]     # per row (row order = example order x row_keys)
    size: int                          # examples in the batch
    image_prompts: list | None = None  # per unique image, for prompt-dependent encoders

    def to(self, device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.tensors.items()}, self.images,
                     self.image_indices, self.size, self.image_prompts)

    def encode(self, adapter):
        """Encode the batch's unique images once (None for a text-only batch)."""
        if not self.images:
            return None
        return adapter.encode_images(self.images, prompts=self.image_prompts)


def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    L = max((len(s) for s in seqs), default=0)
    rows = [list(s) + [value] * (L - len(s)) if side == "right" else [value] * (L - len(s)) + list(s)
            for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def unique_images(examples: Sequence[Example], loader: ImageLoader) -> tuple[list, list[list[int]], list]:
    """Deduplicate the batch's images by (identity, encoding prompt).

    Returns the unique ImageInputs, per-example index lists, and per unique image its prompt.
    """
    keys: dict[tuple, int] = {}
    uniq, per_ex, prompts = [], [], []
    for ex in examples:
        idx = []
        eps = ex.image_prompts or [None] * len(ex.images)
        for ref, pr in zip(ex.images, eps):
            k = (ref.key(), pr)
            if k not in keys:
                keys[k] = len(uniq)
                uniq.append(loader.inputs(ref))
                prompts.append(pr)
            idx.append(keys[k])
        per_ex.append(idx)
    return uniq, per_ex, prompts


def pack_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """The indices of ``lengths`` grouped into rows whose lengths add up to at most ``budget``:
    as few rows as best-fit decreasing needs (longest first, each into the fullest row it still
    fits), and among layouts with that many rows the one whose longest row is shortest, since a
    batch is as wide as its longest row (the rest is padding): the rows are balanced
    longest-first (each sample into the emptiest row) where that stays within the budget. Within a
    row the indices keep their given order. Every length must be <= ``budget``
    (:func:`check_pack_budget` says which is not)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if order and lengths[order[0]] > budget:
        raise ValueError(f"length {lengths[order[0]]} is over the pack budget {budget}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:  # best-fit decreasing: the fewest rows
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (room[r], r))
        else:
            rows.append([])
            room.append(budget)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    balanced: list[list[int]] = [[] for _ in rows]
    load = [0] * len(rows)
    for i in order:  # the same number of rows, balanced: a narrower batch when it fits the budget
        r = min(range(len(rows)), key=lambda r: (load[r], r))
        if load[r] + lengths[i] > budget:
            break
        balanced[r].append(i)
        load[r] += lengths[i]
    else:
        if max(load, default=0) < budget - min(room, default=0):
            rows = balanced
    return [sorted(r) for r in rows]


def check_pack_budget(examples: Sequence[Example], budget: int, loader: ImageLoader | None = None) -> None:
    """Refuse (LengthError naming the record) an example longer than the pack budget: a pack holds
    whole samples, so such a sample could only be cut, and cutting it would drop image or
    response tokens."""
    for ex in examples:
        n = len(ex.rows["input_ids"])
        if n <= budget:
            continue
        what = f"{len(ex.images)} image(s)"
        if loader is not None and ex.images:
            what = f"images: {sum(loader.inputs(r).num_tokens for r in ex.images)} tokens for {what}"
        rec = ex.record
        raise LengthError(f"sample is {n} tokens ({what}), over the pack budget data.pack_length={budget}; "
                          "a pack holds whole samples and never cuts one (image tokens included): raise "
                          "data.pack_length or leave the sample out",
                          file=getattr(rec, "source", None), index=getattr(rec, "index", None))


class SFTCollator:
    """Rows ``input_ids`` + ``labels`` -> right-padded batch.

    With ``pack_length`` (SFT's ``data.packing``) the micro-batch's samples are packed into as
    few rows as hold them within ``pack_length`` tokens each, as evenly as the budget allows
    (:func:`pack_rows`), each sample whole: its image tokens are never split or dropped. The batch then carries
    ``segment_ids`` (per token: 1, 2, ... for the row's samples in order, 0 on padding), from
    which the model adapter restarts position ids per sample and keeps attention inside each
    sample (``VLMAdapter.forward(segment_ids=...)``). The label of each sample's first token is
    ignored, so the previous sample's last token never predicts it (it is never a target in an
    unpacked row either): the supervised tokens, and so ``num_items``, are the unpacked batch's.
    The same samples form the micro-batch either way; only their layout changes.
    """

    def __init__(self, loader: ImageLoader, pad_id: int, pack_length: int | None = None):
        self.loader = loader
        self.pad_id = pad_id
        self.pack_length = pack_length

    def __call__(self, examples: Sequence[Example]) -> Batch:
        if self.pack_length is not None:
            return self._packed(examples)
        ids = [ex.rows["input_ids"] for ex in examples]
        labels = [ex.rows["labels"] for ex in examples]
        uniq, per_ex, prompts = unique_images(examples, self.loader)
        input_ids = pad(ids, self.pad_id)
        tensors = {
            "input_ids": input_ids,
            "attention_mask": pad([[1] * len(s) for s in ids], 0),
            "labels": pad(labels, IGNORE_INDEX),
        }
        # per-record forward inputs (one integer each, e.g. AlignGPT's alignment_level)
        for key in examples[0].rows.keys() - {"input_ids", "labels"}:
            tensors[key] = torch.tensor([ex.rows[key] for ex in examples], dtype=torch.long)
        return Batch(tensors, uniq, per_ex, len(examples), prompts)

    def _packed(self, examples: Sequence[Example]) -> Batch:
        check_pack_budget(examples, self.pack_length, self.loader)
        uniq, per_ex, prompts = unique_images(examples, self.loader)
        rows = pack_rows([len(ex.rows["input_ids"]) for ex in examples], self.pack_length)
        ids, labels, segs, indices = [], [], [], []
        for row in rows:
            r_ids, r_labels, r_segs, r_idx = [], [], [], []
            for k, i in enumerate(row, start=1):
                ex = examples[i]
                r_ids += ex.rows["input_ids"]
                r_labels += [IGNORE_INDEX] + list(ex.rows["labels"][1:])
                r_segs += [k] * len(ex.rows["input_ids"])
                r_idx += per_ex[i]
            ids.append(r_ids)
            labels.append(r_labels)
            segs.append(r_segs)
            indices.append(r_idx)
        tensors = {
            "input_ids": pad(ids, self.pad_id),
            "attention_mask": pad([[1] * len(s) for s in ids], 0),
            "labels": pad(labels, IGNORE_INDEX),
            "segment_ids": pad(segs, 0),
        }
        return Batch(tensors, uniq, indices, len(examples), prompts)
