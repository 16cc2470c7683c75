"""Qwen3-VL (``qwen3_vl``): ViT with 2x2 patch merger and DeepStack mergers -> Qwen3 decoder.

The interface is Qwen2-VL's (``qwen2_vl.py``: flattened patches + ``image_grid_thw``,
``<|image_pad|>`` inside ``<|vision_start|>...<|vision_end|>``, M-RoPE from ``image_grid_thw`` and
``mm_token_type_ids``), so :class:`Qwen3VLAdapter` subclasses that adapter. What differs:

* **DeepStack**: besides the merged features the tower returns, from each of
  ``deepstack_visual_indexes`` of its blocks, another merged feature map that the decoder adds to
  the image tokens' hidden states after its first ``len(deepstack_visual_indexes)`` layers. The
  forward needs them with precomputed features too (without them the logits differ). One image's
  encoding therefore holds ``1 + L`` feature maps; ``EncodedImages.features[i]`` keeps them side by
  side, ``(num_tokens, (1 + L) * hidden)`` (main first), so every caller that selects, caches or
  shares an image's features carries the DeepStack maps with it, and ``mm_kwargs`` splits them
  back into ``pooler_output`` and ``deepstack_features``.
* **M-RoPE variant**: interleaved frequency sections (``mrope_section`` over t/h/w interleaved)
  and timestamps instead of temporal positions for videos. Both live inside the model; for images
  it takes the same inputs as Qwen2-VL, which the inherited hooks pass.
* **Projector group**: the DeepStack mergers (``model.visual.deepstack_merger_list.``) are
  projector, like the main merger. The adapter names each merger (``...deepstack_merger_list.0.``)
  rather than their ``ModuleList``: LoRA with a trained projector makes the projector's modules
  PEFT ``modules_to_save`` copies, and PEFT refuses a ``ModuleList``
  (``tests/integration/test_families.py::test_lora_sft_step_trains_the_adapters_and_keeps_the_base``).
* **Template**: Qwen3-VL-Instruct's ChatML has no default system prompt.
* The stock processor needs a video processor (torchvision); as for Qwen2-VL, an image-only
  subclass is the tiny builder's processor and the loading fallback.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import Qwen3VLProcessor

from .adapter import EncodedImages
from .image_only import ImageOnlyMixin
from .qwen2_vl import (IMAGE_ONLY_PROCESSORS, Qwen2VLAdapter, finish_tiny_qwen, qwen_special_ids, qwen_text_kwargs,
                       tiny_qwen_image_processor, tiny_qwen_tokenizer)
from .registry import register, register_tiny

# Qwen3-VL-Instruct's chat layout for text and images: ChatML, the system turn only when given,
# images in place as <|vision_start|><|image_pad|><|vision_end|>, <|im_end|> closing every turn.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}{{- content['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class Qwen3VLImageOnlyProcessor(ImageOnlyMixin, Qwen3VLProcessor):
    pass


IMAGE_ONLY_PROCESSORS["qwen3_vl"] = Qwen3VLImageOnlyProcessor


@register
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    projector_prefixes = ("model.visual.merger.", "model.visual.deepstack_merger_list.")

    def __init__(self, model, processor):
        super().__init__(model, processor)
        # one prefix per DeepStack merger (module docstring: PEFT's modules_to_save takes no ModuleList)
        n = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())
        self.projector_prefixes = ("model.visual.merger.",
                                   *(f"model.visual.deepstack_merger_list.{i}." for i in range(n)))

    def _encode(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(**batch, return_dict=True)
        # per image: the main features, then each DeepStack layer's, side by side
        return [torch.cat([main, *(layer[i] for layer in out.deepstack_features)], dim=-1)
                for i, main in enumerate(out.pooler_output)]

    def mm_kwargs(self, encoded: EncodedImages | None, indices: Sequence[int]) -> dict[str, Any]:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
        out = super().mm_kwargs(encoded, indices)
        if out:
            hidden = self.model.config.text_config.hidden_size
            parts = [f.split(hidden, dim=-1) for f in out["mm_encoder_outputs"]["image"].pooler_output]
            out["mm_encoder_outputs"]["image"] = BaseModelOutputWithDeepstackFeatures(
                pooler_output=tuple(p[0] for p in parts),
                deepstack_features=[tuple(p[k] for p in parts) for k in range(1, len(parts[0]))])
        return out


@register_tiny("qwen3_vl")
def build_tiny_qwen3_vl(patch_size: int = 8, hidden: int = 64, vision_hidden: int = 32, layers: int = 2,
                        seed: int = 0):
    """Random-init Qwen3-VL-architecture model (DeepStack from vision block 0 into decoder layer 0,
    interleaved M-RoPE, q/k norms) + image-only processor, offline; token counts as tiny Qwen2-VL's."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = tiny_qwen_tokenizer(QWEN3_VL_CHAT_TEMPLATE)
    text = qwen_text_kwargs(tok, hidden, layers)
    text.update(head_dim=hidden // text["num_attention_heads"])
    text["rope_parameters"]["mrope_interleaved"] = True
    config = Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=2,
                           out_hidden_size=hidden, patch_size=patch_size, temporal_patch_size=2,
                           spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0]),
        text_config=text, tie_word_embeddings=False, **qwen_special_ids(tok),
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    return finish_tiny_qwen(model, Qwen3VLImageOnlyProcessor, tok, tiny_qwen_image_processor(patch_size),
                            QWEN3_VL_CHAT_TEMPLATE)
