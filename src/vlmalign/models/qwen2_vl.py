"""Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``): ViT with 2x2 patch merger -> Qwen2.

Quirks handled here:

* Images are resized to multiples of ``patch_size * merge_size`` within [min_pixels, max_pixels],
  so the token count depends on the image size: ``t * h * w / merge_size**2`` for the patch grid
  ``image_grid_thw = (t, h, w)``. ``pixel_values`` are flattened patches
  ``(sum of t*h*w, C * temporal_patch * patch**2)``, one ``image_grid_thw`` row per image.
* The decoder uses M-RoPE: 3-D position ids (temporal, height, width) computed from
  ``image_grid_thw`` and ``mm_token_type_ids`` (1 on image tokens), so the forward needs both
  even when the features arrive precomputed through ``mm_encoder_outputs``. ``mm_kwargs`` passes
  the grid rows of the images it hands over (in placeholder order) and
  ``_extra_forward_kwargs`` derives ``mm_token_type_ids`` from the ids. Padded positions are
  skipped by the model's ``get_rope_index`` through ``attention_mask`` (left or right padding).
* Packed rows (``data.packing``): the M-RoPE ids are computed per sample (the model's
  ``get_rope_index`` on the samples laid out as an unpacked batch, then put back in place) and
  handed over as transformers' packed layout ``(4, B, T)``: the text positions (restarting at
  every sample, from which transformers builds the block-diagonal mask) then t / h / w.
* ``get_image_features(...).pooler_output`` is already a tuple of per-image
  ``(num_tokens_i, hidden)`` tensors (merged, projected): the base ``_encode`` uses it as is.
* The stock processors require a video processor, which needs torchvision. The tiny builders
  use an image-only subclass; :meth:`Qwen2VLAdapter.load_processor` falls back to building it
  from the saved tokenizer + image processor + chat template when ``AutoProcessor`` fails
  (ImportError without torchvision on stock checkpoints) or, on our saved directories, quietly
  returns the bare tokenizer (it does not know the image-only class name).
* Parameter groups: the patch merger ``model.visual.merger.`` is the projector although it sits
  inside ``model.visual.``, so projector prefixes are checked before vision prefixes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

from .adapter import (EncodedImages, ImageInputs, VLMAdapter, saved_chat_template, segment_positions,
                      segment_spans, unpack_segments)
from .image_only import ImageOnlyMixin
from .registry import register, register_tiny
from .tiny_tokenizer import build_tiny_tokenizer

# Qwen2-VL-Instruct's chat template (also Qwen2.5-VL-Instruct's): ChatML, a default system
# prompt when none is given, images in place as <|vision_start|><|image_pad|><|vision_end|>,
# <|im_end|> closing every turn.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]


# ---------------------------------------------------------------------- image-only processors
class Qwen2VLImageOnlyProcessor(ImageOnlyMixin, Qwen2VLProcessor):
    pass


class Qwen2_5_VLImageOnlyProcessor(ImageOnlyMixin, Qwen2_5_VLProcessor):
    pass


# model_type -> image-only processor class (qwen3_vl.py adds its own)
IMAGE_ONLY_PROCESSORS: dict[str, type] = {"qwen2_vl": Qwen2VLImageOnlyProcessor,
                                          "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor}


def image_only_processor_class(model_type: str) -> type:
    """The image-only processor class for a Qwen-VL model type."""
    return IMAGE_ONLY_PROCESSORS[model_type]


# ---------------------------------------------------------------------- adapter
@register
class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    placeholder_token = "<|image_pad|>"
    vision_prefixes = ("model.visual.",)
    projector_prefixes = ("model.visual.merger.",)
    encoder_keys = ("pixel_values", "image_grid_thw")
    prefix_sharing = False
    prefix_sharing_note = "M-RoPE position ids are computed from the whole sequence"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        self.video_token_id = getattr(model.config, "video_token_id", None)

    # ------------------------------------------------------------------ loading
    @classmethod
    def _fallback_processor(cls, path: str, *, trust_remote_code: bool = False):
        """Our image-only processor from the saved tokenizer + image processor (used where
        AutoProcessor needs torchvision, or does not know the saved image-only class)."""
        from .loading import read_config
        return cls._build_image_only_processor(path, read_config(path, trust_remote_code=trust_remote_code).model_type)

    @staticmethod
    def _build_image_only_processor(path: str, model_type: str):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        chat_template = saved_chat_template(path, tokenizer)
        return image_only_processor_class(model_type)(image_processor=image_processor, tokenizer=tokenizer,
                                                      chat_template=chat_template)

    # ------------------------------------------------------------------ parameters
    def _group_of(self, name: str) -> str:
        # the merger lives under model.visual. but is the projector
        if name.startswith(self.projector_prefixes):
            return "projector"
        return super()._group_of(name)

    # ------------------------------------------------------------------ images
    def _encode_extras(self, items: Sequence[ImageInputs]) -> dict[str, torch.Tensor]:
        # one (t, h, w) row per image, needed by M-RoPE wherever the image is used
        return {"image_grid_thw": torch.cat([it.tensors["image_grid_thw"] for it in items], dim=0)}

    def mm_kwargs(self, encoded: EncodedImages | None, indices: Sequence[int]) -> dict[str, Any]:
        out = super().mm_kwargs(encoded, indices)
        if out:
            grid = encoded.extras["image_grid_thw"]
            out["image_grid_thw"] = grid[torch.as_tensor(list(indices), dtype=torch.long)].to(self.device)
        return out

    def _extra_forward_kwargs(self, input_ids, attention_mask, mm) -> dict:
        # M-RoPE needs to know which positions are image (1) / video (2) tokens
        if "image_grid_thw" not in mm and "video_grid_thw" not in mm:
            return {}
        types = (input_ids == self.image_token_id).int()
        if self.video_token_id is not None:
            types = types + 2 * (input_ids == self.video_token_id).int()
        return {"mm_token_type_ids": types}

    def _packed_position_ids(self, input_ids, segment_ids, mm) -> torch.Tensor:
        """(4, B, T): text positions restarting per sample, then each sample's own M-RoPE
        (t, h, w) ids, exactly those it gets alone in an unpacked row."""
        text = segment_positions(segment_ids)
        rope = text.unsqueeze(0).expand(3, -1, -1).clone()
        if "image_grid_thw" in mm:
            spans = segment_spans(segment_ids)
            ids, mask = unpack_segments(input_ids, spans)
            types = self._extra_forward_kwargs(ids, mask, mm)["mm_token_type_ids"] * mask
            # the grid rows are in placeholder order over the packed rows, which is the samples' order
            pos, _ = self.model.model.get_rope_index(ids, types, image_grid_thw=mm["image_grid_thw"],
                                                     attention_mask=mask)
            for s, (r, a, b) in enumerate(spans):
                rope[:, r, a:b] = pos[:, s, : b - a].to(rope.device)
        return torch.cat([text.unsqueeze(0), rope], dim=0)


@register
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: same interface; the vision tower uses windowed attention and an RMSNorm +
    MLP merger (still ``model.visual.merger.``)."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)


# ---------------------------------------------------------------------- tiny builders
def tiny_qwen_tokenizer(chat_template: str = QWEN2_VL_CHAT_TEMPLATE):
    return build_tiny_tokenizer(QWEN_SPECIAL_TOKENS, bos_token=None, eos_token="<|im_end|>",
                                pad_token="<|endoftext|>", chat_template=chat_template)


def tiny_qwen_image_processor(patch_size: int, merge_size: int = 2, min_tokens: int = 4, max_tokens: int = 36):
    """Qwen2-VL image processor (PIL backend) whose token count per image lies in
    [min_tokens, max_tokens]: one token per (patch * merge)^2 pixels, so a 64x64 image with
    patch 8 gives 16 tokens."""
    from transformers import Qwen2VLImageProcessorPil
    unit = (patch_size * merge_size) ** 2
    return Qwen2VLImageProcessorPil(patch_size=patch_size, temporal_patch_size=2, merge_size=merge_size,
                                    min_pixels=min_tokens * unit, max_pixels=max_tokens * unit)


def qwen_text_kwargs(tok, hidden: int, layers: int):
    heads = 4
    half = hidden // heads // 2  # M-RoPE splits head_dim/2 frequencies into (t, h, w) sections
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def finish_tiny_qwen(model, processor_cls, tok, image_processor, chat_template: str = QWEN2_VL_CHAT_TEMPLATE):
    """The image-only processor for a tiny Qwen-VL model, and its generation config's ids."""
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, chat_template=chat_template)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model, processor


def qwen_special_ids(tok) -> dict:
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return ids


@register_tiny("qwen2_vl")
def build_tiny_qwen2_vl(patch_size: int = 8, hidden: int = 64, vision_hidden: int = 32, layers: int = 2,
                        seed: int = 0):
    """Random-init Qwen2-VL-architecture model + image-only processor, fully offline."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = tiny_qwen_tokenizer()
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=vision_hidden, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                           patch_size=patch_size, temporal_patch_size=2, spatial_merge_size=2),
        text_config=qwen_text_kwargs(tok, hidden, layers), tie_word_embeddings=False, **qwen_special_ids(tok),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    return finish_tiny_qwen(model, image_only_processor_class("qwen2_vl"), tok, tiny_qwen_image_processor(patch_size))


@register_tiny("qwen2_5_vl")
def build_tiny_qwen2_5_vl(patch_size: int = 8, hidden: int = 64, vision_hidden: int = 32, layers: int = 2,
                          seed: int = 0):
    """Random-init Qwen2.5-VL-architecture model (windowed vision attention: 2x2 merged-token
    windows, block 1 full attention) + image-only processor, fully offline."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tiny_qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=2,
                           out_hidden_size=hidden, patch_size=patch_size, temporal_patch_size=2,
                           spatial_merge_size=2, window_size=patch_size * 2 * 2, fullatt_block_indexes=[1]),
        text_config=qwen_text_kwargs(tok, hidden, layers), tie_word_embeddings=False, **qwen_special_ids(tok),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return finish_tiny_qwen(model, image_only_processor_class("qwen2_5_vl"), tok, tiny_qwen_image_processor(patch_size))
