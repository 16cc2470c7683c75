"""Batches of completions that share their record's prompt and images, for KTO (unpaired
examples) and listwise DPO (ranked lists).

Both build a :class:`~vlmalign.data.preference.PreferenceBatch` (prompts, completion rows,
unique images; see that module), so ``methods/logps.py`` computes their log-probs with the
image features encoded once per batch and each prompt run once where prefix sharing is exact:

* **unpaired** (KTO): per record one prompt and two row groups, ``completion`` (the record's
  own) and ``kl``: the completion of *another* record under this record's prompt and images, the
  mismatched pair KTO's KL reference point is estimated from. The partner is fixed before
  training (:func:`add_mismatched_rows`), so the reference values of ``kl`` rows can be cached.
* **ranked** (listwise DPO): per record one prompt and one row per candidate (best first);
  lists of unequal length add no padded rows: ``cand_row`` (B, K) maps each (record, rank) to
  its row, -1 past the end of a shorter list.

Records are tokenized once before training (``data.batching.prepare``); the collators never
re-tokenize. A mismatched row is the partner's completion ids appended to this record's
prompt ids: exact, because every prompt ends with the same assistant opener and chat templates
are prefix-stable (so a completion tokenizes the same after any prompt; tested per family).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import DataError, LengthError
from .batching import Example, ImageLoader, pad, unique_images
from .preference import PreferenceBatch

UNPAIRED_ROWS = ("completion", "kl")
PARTNER_TRIES = 16


def _tensors(prompts: list[list[int]], rows: list[tuple[int, list[int]]], pad_id: int,
             examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """PreferenceBatch tensors for ``rows`` = (prompt index, completion ids), in row order."""
    row_prompt = [p for p, _ in rows]
    comps = [c for _, c in rows]
    plens = [len(p) for p in prompts]
    seqs = [prompts[p] + c for p, c in rows]
    return {
        "prompt_ids": pad(prompts, pad_id),
        "prompt_lens": torch.tensor(plens, dtype=torch.long),
        "completion_ids": pad(comps, pad_id),
        "completion_mask": pad([[1] * len(c) for c in comps], 0).bool(),
        "row_prompt": torch.tensor(row_prompt, dtype=torch.long),
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "row_prompt_lens": torch.tensor([plens[p] for p in row_prompt], dtype=torch.long),
        "example_index": torch.tensor([ex.rows.get("_index", [-1])[0] for ex in examples], dtype=torch.long),
    }


# ----------------------------------------------------------------------------- unpaired (KTO)
def tokenize_unpaired(adapter, record, images, *, max_length: int | None) -> dict[str, list[int]]:
    """Rows of one UnpairedExample: ``prompt``, ``completion`` (ends with EOS), ``label`` ([1]
    desirable, [0] undesirable)."""
    from .schema import UnpairedExample
    if not isinstance(record, UnpairedExample):
        raise DataError(f"expected an unpaired example (prompt, completion, label), got a "
                        f"{type(record).__name__} record", field="kind")
    p, c, _ = adapter.tokenize_completion(record.prompt, record.completion, images, max_length=max_length)
    return {"prompt": p, "completion": c, "label": [int(bool(record.label))]}


def add_mismatched_rows(examples: Sequence[Example], *, seed: int, max_length: int | None,
                        file: str | None = None) -> None:
    """Give every example a ``kl`` row: another example's completion, under this one's prompt.

    The partners follow one seeded cycle through the examples (example ``order[k]`` takes the
    completion of ``order[k+1]``), so no example is its own partner; where the pair would exceed
    ``max_length`` the next ones in the cycle are tried (at most 16). Fixed for the run, so the
    reference log-probs of the mismatched pairs can be precomputed and cached.
    """
    n = len(examples)
    if n < 2:
        raise DataError(f"KTO's KL estimate (kto.kl_estimate=mismatched) pairs each example with another "
                        f"one's completion; this data has {n} example(s). Use kto.kl_estimate=zero or more data",
                        file=file)
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=g).tolist()
    pos = {ex_i: k for k, ex_i in enumerate(order)}
    for i, ex in enumerate(examples):
        plen = len(ex.rows["prompt"])
        for step in range(1, min(n, PARTNER_TRIES + 1)):
            j = order[(pos[i] + step) % n]
            comp = examples[j].rows["completion"]
            if max_length is None or plen + len(comp) <= max_length:
                break
        else:
            rec = ex.record
            raise LengthError(f"no other example's completion fits after this prompt ({plen} tokens) within "
                              f"max_length {max_length} (tried {min(n - 1, PARTNER_TRIES)}); needed for KTO's "
                              "KL estimate: raise data.max_length or use kto.kl_estimate=zero",
                              file=getattr(rec, "source", file), index=getattr(rec, "index", None))
        ex.rows["kl"] = list(comp)
        ex.rows["_kl_partner"] = [j]


class UnpairedCollator:
    """Examples made by :func:`tokenize_unpaired` -> PreferenceBatch with row groups
    ``completion`` and (``kl=True``) ``kl``, plus ``desirable`` (B,) bool."""

    def __init__(self, loader: ImageLoader, pad_id: int, kl: bool = True):
        self.loader = loader
        self.pad_id = pad_id
        self.kl = kl

    def __call__(self, examples: Sequence[Example]) -> PreferenceBatch:
        uniq, per_ex, img_prompts = unique_images(examples, self.loader)
        prompts = [ex.rows["prompt"] for ex in examples]
        rows = [(b, ex.rows["completion"]) for b, ex in enumerate(examples)]
        names = UNPAIRED_ROWS if self.kl else UNPAIRED_ROWS[:1]
        if self.kl:
            if any("kl" not in ex.rows for ex in examples):
                raise ValueError("examples have no KL rows: call add_mismatched_rows first")
            rows += [(b, ex.rows["kl"]) for b, ex in enumerate(examples)]
        t = _tensors(prompts, rows, self.pad_id, examples)
        t["desirable"] = torch.tensor([bool(ex.rows["label"][0]) for ex in examples], dtype=torch.bool)
        return PreferenceBatch(t, uniq, per_ex, len(examples), img_prompts, names)


def select_rows(batch: PreferenceBatch, names: Sequence[str]) -> PreferenceBatch:
    """The same batch (prompts, images) with only the row groups ``names``."""
    keep = torch.cat([torch.arange(batch.size) + batch.row_names.index(n) * batch.size for n in names])
    keep = keep.to(batch.tensors["row_prompt"].device)
    t = dict(batch.tensors)
    for k in ("completion_ids", "completion_mask", "row_prompt", "input_ids", "attention_mask", "row_prompt_lens"):
        t[k] = batch.tensors[k][keep]
    return PreferenceBatch(t, batch.images, batch.image_indices, batch.size, batch.image_prompts, tuple(names))


# ----------------------------------------------------------------------------- ranked lists
def tokenize_ranked(adapter, record, images, *, max_length: int | None) -> dict[str, list[int]]:
    """Rows of one RankedList: ``prompt`` and ``cand_0``, ``cand_1``, ... (best first, each
    ending with EOS). Every candidate with the prompt must fit ``max_length``."""
    from .schema import RankedList
    if not isinstance(record, RankedList):
        raise DataError(f"expected a ranked list, got a {type(record).__name__} record", field="kind")
    rows: dict[str, list[int]] = {}
    for k, resp in enumerate(record.responses):
        try:
            p, c, _ = adapter.tokenize_completion(record.prompt, resp, images, max_length=max_length)
        except DataError as e:
            raise e.located(field=f"responses[{k}]") from None
        if "prompt" in rows and p != rows["prompt"]:
            raise DataError("the prompt tokenizes differently before this response than before the first "
                            "(the tokenizer merges across the prompt/response boundary)", field=f"responses[{k}]")
        rows["prompt"] = p
        rows[f"cand_{k}"] = c
    return rows


def num_candidates(ex: Example) -> int:
    return sum(1 for k in ex.rows if k.startswith("cand_"))


class RankedBatch(PreferenceBatch):
    """A PreferenceBatch of ranked lists: rows in record order, candidates best first, and
    ``tensors["cand_row"]`` (B, K): the row of each (record, rank), -1 where the list is shorter."""

    def to(self, device) -> "RankedBatch":
        return RankedBatch({k: v.to(device) for k, v in self.tensors.items()}, self.images, self.image_indices,
                           self.size, self.image_prompts, self.row_names)

    @property
    def num_rows(self) -> int:
        return int(self.tensors["completion_ids"].shape[0])

    @property
    def candidate_mask(self) -> torch.Tensor:
        return self.tensors["cand_row"] >= 0

    def group(self, t, name):
        raise TypeError("a ranked batch has no row groups; use candidates()")

    def candidates(self, per_row: torch.Tensor) -> torch.Tensor:
        """(R,) per-row values -> (B, K), 0 where a list has no candidate."""
        idx = self.tensors["cand_row"]
        vals = per_row[idx.clamp(min=0)]
        return torch.where(idx >= 0, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))


class RankedCollator:
    """Examples made by :func:`tokenize_ranked` -> :class:`RankedBatch` with K = ``k`` columns
    (the longest list of the data set, so every batch has the same K)."""

    def __init__(self, loader: ImageLoader, pad_id: int, k: int):
        self.loader = loader
        self.pad_id = pad_id
        self.k = k

    def __call__(self, examples: Sequence[Example]) -> RankedBatch:
        uniq, per_ex, img_prompts = unique_images(examples, self.loader)
        prompts = [ex.rows["prompt"] for ex in examples]
        rows: list[tuple[int, list[int]]] = []
        cand_row = []
        for b, ex in enumerate(examples):
            n = num_candidates(ex)
            if n > self.k:
                raise ValueError(f"a list of {n} candidates in a collator for at most {self.k}")
            cand_row.append([len(rows) + i for i in range(n)] + [-1] * (self.k - n))
            rows += [(b, ex.rows[f"cand_{i}"]) for i in range(n)]
        t = _tensors(prompts, rows, self.pad_id, examples)
        t["cand_row"] = torch.tensor(cand_row, dtype=torch.long)
        return RankedBatch(t, uniq, per_ex, len(examples), img_prompts, ())
