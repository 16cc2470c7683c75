"""LLaVA-NeXT / LLaVA-1.6 (``llava_next``): CLIP tower on AnyRes tiles -> MLP projector -> LM.

Quirks handled here:

* **AnyRes.** The image processor picks the best of ``image_grid_pinpoints`` for the image's
  size, resizes + pads the image to it, cuts it into base-size tiles and adds one downscaled
  "base" tile: ``pixel_values`` is ``(n_images, n_tiles, 3, H, W)`` plus ``image_sizes``
  ``(n_images, 2)`` (original height, width). The tile count differs between images.
* **Token count depends on the image size.** ``get_image_features`` packs each image as
  base-tile features, then the tile grid with the padding rows/columns removed ("unpad") and
  one learned ``image_newline`` vector closing every row. The processor computes the same
  count (``replace_image_token``); the base adapter takes the expansion from it, so truncation
  checks are exact, and ``encode_images`` verifies the count again.
* **Batching images with different tile counts.** ``collate_images`` zero-pads the tile axis
  like the processor does (``_pad_for_batching``); the model slices each image back to its own
  tile count (from ``image_sizes``), so the padding is never encoded.
* **Features format.** ``get_image_features(...).pooler_output`` is a *list* with one packed
  ``(num_features_i, hidden)`` tensor per image (newlines included); the model's forward
  ``torch.cat``s that list, so ``mm_encoder_outputs["image"].pooler_output`` takes our
  per-image list in placeholder order (the base ``mm_kwargs``).
* **Chat template.** llava-hf ships two layouts: Vicuna (``llava-v1.6-vicuna-*``: the
  LLaVA-1.5 ``USER: <image>\\n... ASSISTANT:`` layout) and Mistral (``llava-v1.6-mistral-*``:
  ``[INST] <image>\\n... [/INST]``). The tiny builder uses the Vicuna one by default (EOS closes
  every answer); ``build_tiny_llava_next(template="mistral")`` gives the Mistral one.
* **Parameter groups.** ``model.image_newline`` is a learned vector that lives outside the
  projector module but is part of the vision->language bridge, so it is in ``projector``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .adapter import ImageInputs, VLMAdapter
from .llava import LLAVA_CHAT_TEMPLATE, tiny_clip_vision_config, tiny_llama_config
from .registry import register, register_tiny
from .tiny_tokenizer import build_tiny_tokenizer

# llava-v1.6-mistral layout: "[INST] <image>\nQ [/INST] A</s>[INST] Q2 [/INST] A2</s>".
# The user turn carries " [/INST]", so rendering up to a user turn is the generation prompt.
LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{{ '\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ ' [/INST]' }}"
    "{% else %}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}{% else %}"
    "{% for c in message['content'] %}{{ ' ' + c['text'] }}{% endfor %}{% endif %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

CHAT_TEMPLATES = {"vicuna": LLAVA_CHAT_TEMPLATE, "mistral": LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE}


@register
class LlavaNextAdapter(VLMAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    placeholder_token = "<image>"
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.multi_modal_projector.", "model.image_newline")
    # read by the image encoding outside every module's forward: unsharded under FSDP2
    replicated_params = ("model.image_newline",)
    encoder_keys = ("pixel_values", "image_sizes")

    def collate_images(self, items: Sequence[ImageInputs]) -> dict[str, torch.Tensor]:
        """Stack images with different tile counts: zero-pad the tile axis (dim 1) to the
        largest, as the processor does; the model drops the padding tiles again."""
        pix = [it.tensors["pixel_values"] for it in items]  # each (1, n_tiles_i, 3, H, W)
        n_max = max(p.shape[1] for p in pix)
        padded = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, n_max - p.shape[1])) for p in pix]
        return {"pixel_values": torch.cat(padded, dim=0),                    # (N, n_max, 3, H, W)
                "image_sizes": torch.cat([it.tensors["image_sizes"] for it in items], dim=0)}  # (N, 2)


def tiny_llava_next_image_processor(image_size: int, grid_pinpoints: list[list[int]]):
    from transformers import LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size},
                                      image_grid_pinpoints=grid_pinpoints)


@register_tiny("llava_next")
def build_tiny_llava_next(image_size: int = 32, patch_size: int = 8, hidden: int = 64, seed: int = 0,
                          grid_pinpoints: list[list[int]] | None = None, template: str = "vicuna"):
    """Random-init LLaVA-NeXT model + processor, fully offline.

    Base tile ``image_size`` (32) with ``patch_size`` 8 gives 4x4 patches per tile; the grid
    pinpoints (default 32x64, 64x32, 64x64, as (height, width)) make a 64x64 image 1 + 4 tiles
    -> 16 base + 8x8 grid + 8 newline = 88 tokens, and a 64x32 (w x h) image 1 + 2 tiles.
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    if template not in CHAT_TEMPLATES:
        raise ValueError(f"template must be one of {sorted(CHAT_TEMPLATES)}")
    chat_template = CHAT_TEMPLATES[template]
    grid_pinpoints = grid_pinpoints or [[image_size, 2 * image_size], [2 * image_size, image_size],
                                        [2 * image_size, 2 * image_size]]
    tok = build_tiny_tokenizer(["<image>", "<s>", "</s>", "<pad>", "<unk>", "[INST]", "[/INST]"],
                               bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                               chat_template=chat_template)
    config = LlavaNextConfig(
        vision_config=tiny_clip_vision_config(image_size, patch_size, hidden),
        text_config=tiny_llama_config(len(tok), hidden, tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=grid_pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    processor = LlavaNextProcessor(image_processor=tiny_llava_next_image_processor(image_size, grid_pinpoints),
                                   tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=chat_template)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, processor
