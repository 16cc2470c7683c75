"""Llama 3.2 Vision (``mllama``): a tiled ViT (aspect-ratio tile embeddings, intermediate layers
concatenated) -> linear projector -> a Llama decoder with interleaved cross-attention layers.

Images do not enter the token sequence: each is one ``<|image|>`` token, and the decoder's
cross-attention layers read the projected tile features (``cross_attention_states``) under a
``cross_attention_mask`` (batch, tokens, images, tiles) built from where the image tokens are.
So encode-once applies at the level of the cross-attention states:

* ``encode_images`` runs the tower + projector once per image: ``(max_tiles * patches, hidden)``
  features (padding tiles included, masked later), plus the image's real tile count
  (``extras["num_tiles"]``, from ``aspect_ratio_mask``).
* ``forward`` / ``generate`` build each row's states from its images (rows may share images)
  and derive the mask from the ids with the processor's own functions (an image's tokens attend
  from its ``<|image|>`` to the next one, consecutive images together, the last to the end), so
  chosen, rejected, the reference and k rollouts reuse one encoding.
* **Tokens before a row's first image** read no image under the mask, and the model then lifts
  the mask for them (they attend to every image slot of the row; only the MLP branch is zeroed).
  So padding image slots would change them with the batch. Each row's slots therefore hold whole
  copies of its images (a common multiple of the batch's image counts, at most
  ``MAX_IMAGE_SLOTS``; beyond that zero padding, logged), which gives every row exactly its
  unbatched result; text-only rows get zero states, which equals skipping the cross-attention.
* ``mm_kwargs(encoded, indices)`` treats ``indices`` as ONE row (it has no ids to place them).
* ``generate``: HF's generate would pass ``cross_attention_states`` at every step and grow the
  cross-attention cache; so the adapter runs the prompt but its last token once with the states
  (filling the self- and cross-attention caches) and lets ``generate`` continue from that cache.
* Prefix sharing is off: the continuation of a shared prompt has no image token, so its
  cross-attention mask cannot be derived from its own ids.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

from ..errors import DataError, ModelError
from .adapter import EncodedImages, ImageInputs, VLMAdapter
from .registry import register, register_tiny
from .tiny_tokenizer import build_tiny_tokenizer

log = logging.getLogger(__name__)
# most image slots per row (a common multiple of the batch's image counts); above it, zero padding
MAX_IMAGE_SLOTS = 12

# Llama 3.2 Vision Instruct's turn layout: <|begin_of_text|>, each turn as
# <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>, images as <|image|>, text trimmed.
MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif content['type'] == 'text' -%}{{- content['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


@register
class MllamaAdapter(VLMAdapter):
    family = "mllama"
    model_types = ("mllama",)
    placeholder_token = "<|image|>"
    vision_prefixes = ("model.vision_model.",)
    projector_prefixes = ("model.multi_modal_projector.",)
    # read by the tower's own forward, but the tower is sharded by its children (shard_units), so
    # no unit holds it: unsharded under FSDP2
    replicated_params = ("model.vision_model.class_embedding",)
    head_prefixes = ("lm_head.",)
    encoder_keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
    prefix_sharing = False
    # measured: packed loss 8e-4 and gradients 8e-3 away from the unpacked run (tests/integration/test_sft_packing.py)
    packing_refused = ("images enter through cross-attention with a per-row cross_attention_mask over the row's "
                       "image slots, which packed samples would share")
    prefix_sharing_note = "the cross-attention mask of a continuation depends on image tokens in the prompt"

    # ------------------------------------------------------------------ images
    def preprocess_image(self, image) -> ImageInputs:
        out = super().preprocess_image(image)
        vision = self.model.config.vision_config
        out.num_features = vision.max_num_tiles * self.model.model.vision_model.num_patches
        return out

    def _encode(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        m = self.model.model
        states = m.vision_model(**batch).last_hidden_state          # (N, 1, tiles, patches, dim)
        return list(m.multi_modal_projector(states).flatten(1, 3))  # N x (tiles * patches, hidden)

    def _encode_extras(self, items: Sequence[ImageInputs]) -> dict[str, torch.Tensor]:
        return {"num_tiles": torch.cat([it.tensors["aspect_ratio_mask"].sum(-1).view(-1) for it in items])}

    # ------------------------------------------------------------------ cross-attention inputs
    def cross_attention_mask(self, input_ids: torch.Tensor, num_tiles: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, L, images, max_tiles) mask from the image tokens' places (the processor's rule)."""
        from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                                  get_cross_attention_token_mask)
        sparse = [get_cross_attention_token_mask(row, self.image_token_id) for row in input_ids.tolist()]
        for b, (spans, tiles) in enumerate(zip(sparse, num_tiles)):
            if len(spans) != len(tiles):
                raise DataError(f"row {b} has {len(spans)} image tokens for {len(tiles)} images", field="images")
        dense = convert_sparse_cross_attention_mask_to_dense(
            sparse, [list(t) for t in num_tiles], self.model.config.vision_config.max_num_tiles, input_ids.shape[1])
        return torch.as_tensor(dense, dtype=torch.long, device=input_ids.device)

    def _mm_inputs(self, input_ids, attention_mask, encoded, image_indices) -> dict[str, Any]:
        rows = [list(r) for r in image_indices]
        if encoded is None or not any(rows):
            return {}
        if len(rows) != input_ids.shape[0]:
            raise ModelError(f"mllama: image_indices has {len(rows)} rows for {input_ids.shape[0]} sequences")
        slots = self._image_slots([len(r) for r in rows if r])
        feats = encoded.features
        pad = torch.zeros_like(feats[next(i for r in rows for i in r)])
        states = []
        for r in rows:
            own = [feats[i] for i in r]
            if r and slots % len(r) == 0:  # copies: a query that sees every key sees the same mix
                own = own * (slots // len(r))
            states.append(torch.cat(own + [pad] * (slots - len(own))))
        tiles = [[int(encoded.extras["num_tiles"][i]) for i in r] for r in rows]
        mask = self.cross_attention_mask(input_ids, tiles)
        mask = torch.nn.functional.pad(mask, (0, 0, 0, slots - mask.shape[2]))
        return {"cross_attention_states": torch.stack(states).to(self.device), "cross_attention_mask": mask}

    def _image_slots(self, counts: Sequence[int]) -> int:
        """Image slots per row: a common multiple of the rows' image counts, so each row's slots
        hold whole copies of its images. Tokens before a row's first image have no image to read,
        and the model then lets them attend to ALL the row's slots unmasked; with copies that is
        the same mix as in the row alone, with padding it would not be (batch-dependent)."""
        slots = math.lcm(*counts)
        if slots > MAX_IMAGE_SLOTS:
            slots = max(counts)
            log.warning("mllama: rows with %s images in one batch: tokens before a row's first image read "
                        "zero-padded image slots (batch-dependent, as in the model's own padded forward)",
                        sorted(set(counts)))
        return slots

    def mm_kwargs(self, encoded: EncodedImages | None, indices: Sequence[int]) -> dict[str, Any]:
        """The states of ONE row holding images ``indices`` (the mask needs ids: see ``forward``)."""
        if encoded is None or len(indices) == 0:
            return {}
        return {"cross_attention_states": torch.cat([encoded.features[i] for i in indices]).unsqueeze(0)}

    # ------------------------------------------------------------------ forward / generate
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                encoded: EncodedImages | None = None, image_indices: Sequence[Sequence[int]] = (),
                pixel_inputs: dict[str, torch.Tensor] | None = None, **kwargs):
        """As :meth:`VLMAdapter.forward`: cross-attention states from ``encoded`` per row, or the
        model's own vision path from ``pixel_inputs`` (one row's images may come stacked along
        dim 0, as ``collate_images`` gives them; a missing mask is derived from the ids)."""
        if pixel_inputs is None:
            mm = self._mm_inputs(input_ids, attention_mask, encoded, image_indices)
        else:
            mm = dict(pixel_inputs)
            B = input_ids.shape[0]
            if B == 1 and mm["pixel_values"].shape[0] > 1:
                mm = {k: v.transpose(0, 1) if k != "cross_attention_mask" else v for k, v in mm.items()}
            if "cross_attention_mask" not in mm:
                tiles = mm["aspect_ratio_mask"].sum(-1).tolist()
                mm["cross_attention_mask"] = self.cross_attention_mask(input_ids, tiles)
        return self.runner(input_ids=input_ids, attention_mask=attention_mask, **mm, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 encoded: EncodedImages | None = None, image_indices: Sequence[Sequence[int]] = (),
                 **generate_kwargs) -> torch.Tensor:
        """Prompt (but its last token) run once with the cross-attention states; ``generate``
        continues from that cache with the mask. Returns prompt + new ids."""
        mm = self._mm_inputs(input_ids, attention_mask, encoded, image_indices)
        if not mm:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        k = int(generate_kwargs.pop("num_return_sequences", 1) or 1)
        if k > 1:  # expand before the prefill, in HF's order (each row k times in a row)
            input_ids, attention_mask = input_ids.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0)
            mm = {key: v.repeat_interleave(k, 0) for key, v in mm.items()}
        if input_ids.shape[1] < 2:
            raise ModelError("mllama: generation from encoded images needs a prompt of at least 2 tokens")
        pos = self.position_ids(input_ids, attention_mask)
        with torch.no_grad():
            out = self.model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                             position_ids=pos[:, :-1], cross_attention_states=mm["cross_attention_states"],
                             cross_attention_mask=mm["cross_attention_mask"][:, :-1], use_cache=True, logits_to_keep=1)
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, cache=out.cache,
                                   cross_attention_mask=mm["cross_attention_mask"], **generate_kwargs)


# ---------------------------------------------------------------------- tiny builder
@register_tiny("mllama")
def build_tiny_mllama(image_size: int = 32, patch_size: int = 8, max_tiles: int = 2, hidden: int = 64,
                      vision_hidden: int = 32, seed: int = 0):
    """Random-init Mllama-architecture model (tiled ViT with one intermediate layer concatenated,
    3 decoder layers of which layer 1 is cross-attention, gates open) + the stock MllamaProcessor,
    offline. An image is up to 2 tiles of 4x4 patches + CLS: 34 cross-attention features, 1 token."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil, MllamaProcessor

    tok = build_tiny_tokenizer(["<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|finetune_right_pad_id|>"],
                               bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                               pad_token="<|finetune_right_pad_id|>", chat_template=MLLAMA_CHAT_TEMPLATE)
    image_processor = MllamaImageProcessorPil(size={"height": image_size, "width": image_size},
                                              max_image_tiles=max_tiles)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=MLLAMA_CHAT_TEMPLATE)
    ratios = [[w, h] for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if w * h <= max_tiles]
    vision = dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=2,
                  num_global_layers=1, attention_heads=2, image_size=image_size, patch_size=patch_size,
                  max_num_tiles=max_tiles, intermediate_layers_indices=[0], vision_output_dim=vision_hidden * 2,
                  supported_aspect_ratios=ratios)
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1], max_position_embeddings=2048,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = MllamaConfig(vision_config=vision, text_config=text,
                          image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    # the tanh gates (cross-attention layers, tile and position embeddings) start at 0, which would
    # make the tiny model ignore its images and every parity check pass trivially: open them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate", ".gate")):
                p.fill_(1.0)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, processor
