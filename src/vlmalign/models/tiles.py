"""Images that become several pixel rows (crops, tiles), each encoded to its own block of
features: Gemma 3's pan-and-scan crops, InternVL's tiles + thumbnail.

:class:`TiledImages` is a mixin for such adapters (put it before :class:`VLMAdapter`):

* ``preprocess_image`` runs the processor's image step with the processor's own call defaults
  (``image_kwargs``, from the processor class's ``images_kwargs``: e.g. InternVL's
  ``crop_to_patches=True``, Gemma 3's ``do_pan_and_scan=False``), which take precedence over the
  image processor's attributes in a processor call too; change ``adapter.image_kwargs`` to
  preprocess otherwise (and pass the same to the processor). It keeps the replacement string
  (``ImageInputs.text``) beside the ids.
* ``collate_images`` adds each image's row count (``num_rows``), ``_encode`` splits the tower's
  ``(rows, tokens, hidden)`` output by it and joins an image's blocks, and ``forward`` drops
  ``num_rows`` from ``pixel_inputs`` (it is not a model input).
* ``mm_kwargs`` hands the rows' features as one ``(1, total, hidden)`` tensor: these models call
  ``.to()`` on ``pooler_output`` and scatter it in placeholder order.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .adapter import EncodedImages, ImageInputs

ROWS = "num_rows"


class TiledImages:
    def __init__(self, model, processor):
        super().__init__(model, processor)
        self.image_kwargs: dict[str, Any] = dict(getattr(type(self.processor), "images_kwargs", None) or {})

    def preprocess_image(self, image) -> ImageInputs:
        processed, reps = self.processor._process_images([image], return_tensors="pt", **self.image_kwargs)
        expansion = list(self._encode_text(reps[0])[0])
        n_feat = sum(1 for t in expansion if t == self.image_token_id)
        return ImageInputs(tensors={"pixel_values": processed["pixel_values"]}, expansion=expansion,
                           num_features=n_feat, text=reps[0])

    def collate_images(self, items: Sequence[ImageInputs]) -> dict[str, torch.Tensor]:
        out = super().collate_images(items)
        out[ROWS] = torch.tensor([it.tensors["pixel_values"].shape[0] for it in items])
        return out

    def _encode(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        rows = batch.pop(ROWS).tolist()
        feats = self.model.model.get_image_features(**batch, return_dict=True).pooler_output
        return [f.flatten(0, 1) for f in torch.split(feats, rows, dim=0)]

    def forward(self, input_ids, attention_mask=None, *, pixel_inputs=None, **kwargs):
        if pixel_inputs is not None:
            pixel_inputs = {k: v for k, v in pixel_inputs.items() if k != ROWS}
        return super().forward(input_ids, attention_mask, pixel_inputs=pixel_inputs, **kwargs)

    def mm_kwargs(self, encoded: EncodedImages | None, indices: Sequence[int]) -> dict[str, Any]:
        out = super().mm_kwargs(encoded, indices)
        if out:
            pooled = out["mm_encoder_outputs"]["image"]
            pooled.pooler_output = torch.cat(list(pooled.pooler_output), dim=0).unsqueeze(0)
        return out
