"""Preference pairs -> batches in which each image is encoded once and each prompt can be shared.

A preference batch of B pairs holds:

* **prompts** (P of them): token ids of each distinct (prompt text, images) the rows continue
  from, with the indices of the unique images their placeholders take. Chosen and rejected of a
  pair share one prompt, so normally P = B; a pair whose rejected response is shown with other
  images (``PreferencePair.rejected_images``) adds a prompt, and so does mDPO's corrupted image.
* **rows** (R = len(row_names) x B): one completion each, grouped by name -- all chosen rows,
  then all rejected rows, then (mDPO) the chosen response under the corrupted image. ``row_prompt``
  says which prompt a row continues.
* the same rows as whole sequences (prompt + completion, right-padded) for the unshared forward.

The collator never re-tokenizes: ``tokenize_pair`` runs once per record before training (via
``data.batching.prepare``), with the length limit checked there.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import DataError
from .batching import Example, ImageLoader, pad
from .schema import ImageRef

ROWS = ("chosen", "rejected")
CORRUPT_ROW = "chosen_corrupt"


# ----------------------------------------------------------------------------- corrupted images
@dataclass(frozen=True)
class Corruption:
    """How mDPO's corrupted image is made from the real one (deterministic per record and image).

    ``crop``: keep a random rectangle covering at most ``keep`` of the area (at least 1 pixel a
    side) and resize it back (mDPO, Wang et al. 2024, keeps 0-20 % of the image);
    ``noise``: add Gaussian noise of standard deviation ``noise_std`` (pixel scale 0-1).
    """

    kind: str = "crop"
    keep: float = 0.2
    noise_std: float = 0.5
    seed: int = 0

    def key(self) -> str:
        return f"{self.kind}:{self.keep}:{self.noise_std}:{self.seed}"

    def apply(self, img, token: str):
        """The corrupted copy of PIL image ``img``; ``token`` (record + image) seeds it."""
        import numpy as np
        from PIL import Image
        rng = random.Random(int(hashlib.sha256(f"{self.key()}|{token}".encode()).hexdigest()[:16], 16))
        img = img.convert("RGB")
        w, h = img.size
        if self.kind == "crop":
            frac = rng.uniform(0.0, self.keep)
            aspect = rng.uniform(0.5, 2.0)
            cw = max(1, min(w, round((frac * w * h * aspect) ** 0.5)))
            ch = max(1, min(h, round((frac * w * h / aspect) ** 0.5)))
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
        if self.kind == "noise":
            arr = np.asarray(img, dtype=np.float32) / 255.0
            gen = np.random.default_rng(rng.getrandbits(63))
            arr = np.clip(arr + gen.normal(0.0, self.noise_std, arr.shape), 0.0, 1.0)
            return Image.fromarray((arr * 255.0).round().astype(np.uint8))
        raise ValueError(f"unknown corruption kind {self.kind!r}; valid: crop, noise")


def _corrupt_token(record, i: int, ref: ImageRef) -> str:
    return f"{getattr(record, 'source', None)}|{getattr(record, 'index', None)}|{i}|{ref.key()}"


class _Images:
    """Unique images of one batch, keyed on (kind, identity, encoder prompt)."""

    def __init__(self):
        self.keys: dict[tuple, int] = {}
        self.items: list = []
        self.prompts: list = []

    def index(self, key: tuple, prompt, make: Callable):
        k = (key, prompt)
        if k not in self.keys:
            self.keys[k] = len(self.items)
            self.items.append(make())
            self.prompts.append(prompt)
        return self.keys[k]


def corrupted_input(loader: ImageLoader, corruption: Corruption, record, i: int, ref: ImageRef):
    """The preprocessed corrupted copy of image ``i`` (``ref``) of ``record`` (mDPO)."""
    img = corruption.apply(loader.pil(ref), _corrupt_token(record, i, ref))
    return loader.adapter.preprocess_image(img)


# ----------------------------------------------------------------------------- tokenization
def tokenize_pair(adapter, record, images: Sequence, *, max_length: int | None, loader: ImageLoader,
                  corruption: Corruption | None = None) -> dict[str, list[int]]:
    """Token rows of one PreferencePair: ``prompt``, ``chosen``, ``rejected`` (completions end
    with EOS), plus ``rejected_prompt`` when the rejected response comes with other images and
    ``corrupt_prompt`` (the prompt under mDPO's corrupted images) when ``corruption`` is given.

    With ``corruption``, ``rejected_images`` of the record ARE the corrupted images (the schema's
    mDPO use); the rejected row then keeps the real images.
    """
    from ..data.schema import PreferencePair
    if not isinstance(record, PreferencePair):
        raise DataError(f"expected a preference pair, got a {type(record).__name__} record",
                        file=getattr(record, "source", None), index=getattr(record, "index", None))
    t = adapter.tokenize_preference(record, images, max_length=max_length)
    rows = {"prompt": t.prompt_ids, "chosen": t.chosen_ids, "rejected": t.rejected_ids}
    rej = record.rejected_images
    if rej is not None and len(rej) != len(record.images):
        raise DataError(f"rejected_images has {len(rej)} image(s), the prompt {len(record.images)}",
                        field="rejected_images")
    if corruption is not None:
        if rej is not None:
            alt = [loader.inputs(r) for r in rej]
        else:
            alt = [corrupted_input(loader, corruption, record, i, r) for i, r in enumerate(record.images)]
        p, c, _ = adapter.tokenize_completion(record.prompt, record.chosen, alt, max_length=max_length)
        if c != t.chosen_ids:
            raise DataError("the chosen response tokenizes differently under the corrupted images",
                            field="chosen")
        rows["corrupt_prompt"] = p
    elif rej is not None:
        p, r, _ = adapter.tokenize_completion(record.prompt, record.rejected, [loader.inputs(x) for x in rej],
                                              max_length=max_length)
        rows["rejected_prompt"], rows["rejected"] = p, r
    return rows


# ----------------------------------------------------------------------------- batches
@dataclass
class PreferenceBatch:
    """Prompts, completion rows and unique images of B preference pairs (see module docstring).

    tensors:
      prompt_ids (P, Lp) right-padded with pad id, prompt_lens (P,)
      completion_ids (R, Lc), completion_mask (R, Lc) bool, row_prompt (R,)
      input_ids (R, L), attention_mask (R, L), row_prompt_lens (R,)   -- whole sequences
      example_index (B,)   -- position of each pair in its example list (reference-cache rows)
    """

    tensors: dict[str, torch.Tensor]
    images: list                      # unique ImageInputs
    image_indices: list[list[int]]    # per prompt
    size: int                         # pairs B
    image_prompts: list | None = None
    row_names: tuple[str, ...] = ROWS

    def to(self, device) -> "PreferenceBatch":
        return PreferenceBatch({k: v.to(device) for k, v in self.tensors.items()}, self.images,
                               self.image_indices, self.size, self.image_prompts, self.row_names)

    def encode(self, adapter):
        """Encode the batch's unique images once (None for a text-only batch)."""
        if not self.images:
            return None
        return adapter.encode_images(self.images, prompts=self.image_prompts)

    @property
    def num_rows(self) -> int:
        return self.size * len(self.row_names)

    def row_image_indices(self) -> list[list[int]]:
        ip = self.image_indices
        return [ip[p] for p in self.tensors["row_prompt"].tolist()]

    def group(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """Rows of ``t`` (first dim R) that belong to group ``name`` (B of them)."""
        i = self.row_names.index(name)
        return t[i * self.size:(i + 1) * self.size]


class PreferenceCollator:
    """Examples made by ``tokenize_pair`` -> :class:`PreferenceBatch`.

    Examples carry their position in the example list as ``rows["_index"]`` (set by
    :func:`index_examples`) so cached reference log-probs can be looked up.
    """

    def __init__(self, loader: ImageLoader, pad_id: int, corruption: Corruption | None = None):
        self.loader = loader
        self.pad_id = pad_id
        self.corruption = corruption

    def __call__(self, examples: Sequence[Example]) -> PreferenceBatch:
        imgs = _Images()
        prompts: list[list[int]] = []
        prompt_images: list[list[int]] = []
        names = ROWS + ((CORRUPT_ROW,) if self.corruption is not None else ())
        rows: dict[str, list[tuple[int, list[int]]]] = {n: [] for n in names}
        for ex in examples:
            rec = ex.record
            eps = ex.image_prompts or [None] * len(ex.images)
            idx = [imgs.index(("image", ref.key()), pr, lambda r=ref: self.loader.inputs(r))
                   for ref, pr in zip(ex.images, eps)]
            base = len(prompts)
            prompts.append(ex.rows["prompt"])
            prompt_images.append(idx)
            rows["chosen"].append((base, ex.rows["chosen"]))
            rej = getattr(rec, "rejected_images", None)
            if "rejected_prompt" in ex.rows:
                ridx = [imgs.index(("image", ref.key()), pr, lambda r=ref: self.loader.inputs(r))
                        for ref, pr in zip(rej, eps)]
                prompts.append(ex.rows["rejected_prompt"])
                prompt_images.append(ridx)
                rows["rejected"].append((len(prompts) - 1, ex.rows["rejected"]))
            else:
                rows["rejected"].append((base, ex.rows["rejected"]))
            if self.corruption is not None:
                if "corrupt_prompt" not in ex.rows:
                    raise ValueError("examples were tokenized without mDPO's corrupted prompt")
                cidx = []
                for i, (ref, pr) in enumerate(zip(ex.images, eps)):
                    if rej is not None:
                        cidx.append(imgs.index(("image", rej[i].key()), pr,
                                               lambda r=rej[i]: self.loader.inputs(r)))
                    else:
                        cidx.append(imgs.index(
                            ("corrupt", self.corruption.key(), _corrupt_token(rec, i, ref)), pr,
                            lambda r=ref, i=i, rec=rec: corrupted_input(self.loader, self.corruption, rec, i, r)))
                prompts.append(ex.rows["corrupt_prompt"])
                prompt_images.append(cidx)
                rows[CORRUPT_ROW].append((len(prompts) - 1, ex.rows["chosen"]))
        flat = [r for n in names for r in rows[n]]
        row_prompt = [p for p, _ in flat]
        comps = [c for _, c in flat]
        plens = [len(p) for p in prompts]
        seqs = [prompts[p] + c for p, c in flat]
        tensors = {
            "prompt_ids": pad(prompts, self.pad_id),
            "prompt_lens": torch.tensor(plens, dtype=torch.long),
            "completion_ids": pad(comps, self.pad_id),
            "completion_mask": pad([[1] * len(c) for c in comps], 0).bool(),
            "row_prompt": torch.tensor(row_prompt, dtype=torch.long),
            "input_ids": pad(seqs, self.pad_id),
            "attention_mask": pad([[1] * len(s) for s in seqs], 0),
            "row_prompt_lens": torch.tensor([plens[p] for p in row_prompt], dtype=torch.long),
            "example_index": torch.tensor([ex.rows.get("_index", [-1])[0] for ex in examples], dtype=torch.long),
        }
        return PreferenceBatch(tensors, imgs.items, prompt_images, len(examples), imgs.prompts, names)


def index_examples(examples: Sequence[Example]) -> list[Example]:
    """Record each example's position (``rows["_index"]``) for reference-cache lookups."""
    for i, ex in enumerate(examples):
        ex.rows["_index"] = [i]
    return list(examples)
