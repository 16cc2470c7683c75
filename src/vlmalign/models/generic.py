"""Fallback adapter for AutoModelForImageTextToText models without a dedicated adapter.

It relies on the transformers 5.x processor contract (``_process_images`` returning per-image
replacement strings, used by the base class) and on ``get_image_features`` +
``mm_encoder_outputs``. Parameter groups are guessed from module names (``vision``/``visual``
for the tower; ``projector``/``merger``/``connector`` for the projector).

Models read precomputed features (``mm_encoder_outputs["image"].pooler_output``) in one of two
forms: a sequence of per-image tensors that the forward concatenates (LLaVA, Mistral3,
LLaVA-OneVision), or one tensor it moves with ``.to`` and scatters into the image tokens in
order (VipLLaVA, Aya Vision, GOT-OCR2; FastVLM has its own adapter in timm_towers.py). :class:`ImageFeatures` is both: a list of the
per-image tensors whose ``.to`` gives them concatenated. Tested on a tiny VipLLaVA
(``tests/integration/test_generic.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .adapter import EncodedImages, VLMAdapter


class ImageFeatures(list):
    """Per-image feature tensors; ``.to(...)`` gives them concatenated along the token axis, the
    one tensor that models scattering features into the image tokens in order take."""

    def to(self, *args, **kwargs) -> torch.Tensor:
        return torch.cat(list(self), dim=0).to(*args, **kwargs)


class GenericAdapter(VLMAdapter):
    family = "generic"
    # an unknown model may not read packed position ids; a 4-D mask it cannot take fails loudly
    packing_attention = "mask"

    def __init__(self, model, processor):
        token = getattr(processor, "image_token", None)
        if token is not None:
            self.placeholder_token = token
        super().__init__(model, processor)
        prefixes = {".".join(n.split(".")[:2]) + "." for n, _ in model.named_parameters() if n.count(".") >= 2}
        self.vision_prefixes = tuple(sorted(p for p in prefixes if "vision" in p or "visual" in p))
        self.projector_prefixes = tuple(sorted(p for p in prefixes if any(
            k in p for k in ("projector", "merger", "connector"))))

    def mm_kwargs(self, encoded: EncodedImages | None, indices: Sequence[int]) -> dict[str, Any]:
        if encoded is None or len(indices) == 0:
            return {}
        feats = ImageFeatures(encoded.features[i] for i in indices)
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)}}
