"""AlignGPT's alignment buckets for a LLaVA data file (``vlmalign data align-levels``).

Each record's image-text similarity is the cosine of an image vector and a text vector from a
scorer model:

* a CLIP-like dual encoder directory (transformers ``AutoModel`` with ``get_image_features`` and
  ``get_text_features``; its image processor and tokenizer from the same directory): the
  projected image and text embeddings;
* a VLM directory (LLaVA, composed, or any family vlmalign loads): the mean of the projected
  image tokens against the mean of the text's input embeddings.

The text is the record's assistant turns (the caption in pretraining data; the user turns where
there is none); a record with several images uses the mean of their vectors. The buckets are
quantiles over the file: records sorted by similarity (ties in file order), the one at rank r of
M gets ``floor(r * N / M)``, so each of the N buckets holds M/N records (+-1) and a higher bucket
means a better-aligned pair. The output is the input file with ``similarity`` (the bucket, an
integer 0..N-1) and ``similarity_score`` (the cosine) added to each record.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.images import DEFAULT_MAX_PIXELS, load_image
from ..data.schema import Conversation, ImagePart
from ..errors import DataError, ModelError

FIELD = "similarity"
SCORE_FIELD = "similarity_score"


def quantile_buckets(scores: list[float], n: int) -> list[int]:
    """Bucket of each score: its rank r of M (ascending, ties in order) -> floor(r * n / M)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    out = [0] * len(scores)
    for r, i in enumerate(order):
        out[i] = r * n // len(scores)
    return out


class _DualEncoder:
    def __init__(self, path: str):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ModelError(f"--scorer {path}: {type(self.model).__name__} has no get_image_features / "
                             "get_text_features (pass a CLIP-like dual encoder or a VLM directory)")
        self.images = AutoImageProcessor.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_len = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", 77)

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def image(self, pil) -> torch.Tensor:
        px = self.images(images=[pil], return_tensors="pt")["pixel_values"]
        return self._tensor(self.model.get_image_features(pixel_values=px))[0]

    def text(self, text: str) -> torch.Tensor:
        t = self.tokenizer([text], return_tensors="pt", truncation=True, max_length=self.max_len)
        return self._tensor(self.model.get_text_features(input_ids=t["input_ids"],
                                                         attention_mask=t["attention_mask"]))[0]


class _VLM:
    def __init__(self, path: str):
        from . import load_adapter
        self.adapter = load_adapter(path)
        self.adapter.model.eval()

    def image(self, pil) -> torch.Tensor:
        return self.adapter.encode_images([self.adapter.preprocess_image(pil)]).features[0].mean(0)

    def text(self, text: str) -> torch.Tensor:
        ids = self.adapter.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if not ids.shape[1]:
            raise ValueError("empty text")
        return self.adapter.model.get_input_embeddings()(ids.to(self.adapter.device))[0].mean(0)


def load_scorer(path: str):
    """The scorer of a model directory: a VLM (image-text-to-text) or a dual encoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from .loading import read_config
    config = read_config(path)
    from .aligngpt import MODEL_TYPE as ALIGNGPT
    from .resampler import MODEL_TYPE as RESAMPLER
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or config.model_type in (RESAMPLER, ALIGNGPT):
        return _VLM(path)
    return _DualEncoder(path)


def _text_of(rec: Conversation) -> str:
    answers = [m.text for m in rec.messages if m.role == "assistant"]
    if any(a.strip() for a in answers):
        return "\n".join(answers)
    return "\n".join(p.text for m in rec.messages if m.role == "user" for p in m.content
                     if not isinstance(p, ImagePart))


@dataclass
class AlignLevelsReport:
    records: int
    buckets: int
    counts: list[int]
    out: str


@torch.no_grad()
def align_levels(file: str, scorer: str, out: str, *, buckets: int = 8, image_root: str | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> AlignLevelsReport:
    """Score every record of a LLaVA file with ``scorer`` and write it with its bucket to ``out``."""
    from ..data.readers import iter_records
    from ..data.readers._containers import container_of, iter_raw
    from ..files import write_json, write_lines
    if buckets < 2:
        raise ModelError(f"--buckets {buckets}: at least 2")
    container = container_of(file)
    if container not in ("json", "jsonl"):
        raise DataError("align-levels reads and writes LLaVA .json / .jsonl files", file=str(file))
    raw = {}   # index (as the readers number records) -> the record as read
    for index, obj in iter_raw(file):
        if isinstance(obj, DataError):
            raise obj
        raw[index] = obj
    records = []
    for index, rec in iter_records(file, format="llava"):
        if isinstance(rec, DataError):
            raise rec
        if not isinstance(rec, Conversation):
            raise DataError(f"expected a conversation, got a {type(rec).__name__}", file=str(file), index=index)
        if not rec.images:
            raise DataError("no image: an alignment level needs an image-text pair", file=str(file),
                            index=index, field="image")
        records.append((index, rec))
    if len(records) < buckets:
        raise DataError(f"{len(records)} records for {buckets} buckets: quantile buckets need at least one record "
                        "each", file=str(file))
    model = load_scorer(scorer)
    root = image_root or os.path.dirname(os.path.abspath(file))
    scores = []
    for index, rec in records:
        try:
            img = torch.stack([model.image(load_image(r, root, max_pixels=max_pixels)) for r in rec.images]).mean(0)
            txt = model.text(_text_of(rec))
        except DataError as e:
            raise e.located(file=str(file), index=index) from None
        except ValueError as e:
            raise DataError(f"cannot score the record: {e}", file=str(file), index=index) from None
        scores.append(float(torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=0)))
    levels = quantile_buckets(scores, buckets)
    for (index, _), level, score in zip(records, levels, scores):
        raw[index][FIELD] = level
        raw[index][SCORE_FIELD] = round(score, 6)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    (write_lines if Path(out).suffix.lower() == ".jsonl" else write_json)(out, list(raw.values()))
    counts = [levels.count(b) for b in range(buckets)]
    return AlignLevelsReport(len(records), buckets, counts, str(out))
