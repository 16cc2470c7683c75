"""Fallback adapter for AutoModelForImageTextToText models without a dedicated adapter.

It relies on the transformers 5.x processor contract (``_process_images`` returning per-image
replacement strings, used by the base class) and on ``get_image_features`` +
``mm_encoder_outputs``. Parameter groups are guessed from module names (``vision``/``visual``
for the tower; ``projector``/``merger``/``connector`` for the projector).
"""

from __future__ import annotations

from .adapter import VLMAdapter


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
