"""InternVL 3 (``internvl``, transformers' ``-hf`` checkpoints): InternViT -> pixel shuffle (0.5)
-> LayerNorm + 2-layer MLP projector -> Qwen2.5 decoder.

Quirks handled here:

* **Tiles**: the processor's call cuts an image into up to ``max_patches`` tiles of the tower's
  size chosen by aspect ratio, plus a thumbnail when there is more than one (its own default
  ``crop_to_patches=True`` overrides the image processor's ``False``); every tile is a
  ``pixel_values`` row of ``image_seq_length`` features. ``preprocess_image`` uses those call
  defaults and the tile handling of ``tiles.py``; an image's tiles are encoded together and
  joined, so the token count depends on the image's shape.
* **Placeholder = feature token**: the template renders ``<IMG_CONTEXT>\\n`` per image; the
  processor replaces ``<IMG_CONTEXT>`` by ``<img>`` + ``<IMG_CONTEXT>`` x (tiles x
  ``image_seq_length``) + ``</img>``. The special tokens are the tokenizer's
  ``start_image_token`` / ``context_image_token`` / ``end_image_token`` attributes.
* **Processor without videos**: the stock processor needs a video processor (torchvision); the
  tiny builder saves an image-only one, and :meth:`InternVLAdapter.load_processor` rebuilds it
  from the saved tokenizer, image processor, chat template and ``image_seq_length`` where
  ``AutoProcessor`` fails.
* Plain causal LM with 1-D positions: prefix sharing works.
"""

from __future__ import annotations

import torch
from transformers import InternVLProcessor

from .adapter import VLMAdapter, saved_chat_template
from .image_only import ImageOnlyMixin
from .registry import register, register_tiny
from .tiles import TiledImages
from .tiny_tokenizer import build_tiny_tokenizer

# InternVL3-*-hf's layout: ChatML, no default system turn, each image as <IMG_CONTEXT> + newline.
INTERNVL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif content['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif content['type'] == 'text' -%}{{- content['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

INTERNVL_NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


class InternVLImageOnlyProcessor(ImageOnlyMixin, InternVLProcessor):
    pass


@register
class InternVLAdapter(TiledImages, VLMAdapter):
    family = "internvl"
    model_types = ("internvl",)
    placeholder_token = "<IMG_CONTEXT>"
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.multi_modal_projector.",)
    head_prefixes = ("lm_head.",)

    @classmethod
    def _fallback_processor(cls, path: str, *, trust_remote_code: bool = False):
        """The image-only processor from the saved parts (AutoProcessor needs torchvision for the
        stock processor's video half, and does not know the image-only class)."""
        from transformers import AutoTokenizer, GotOcr2ImageProcessorPil

        from .loading import read_config
        tokenizer = AutoTokenizer.from_pretrained(path)
        seq = read_config(path, trust_remote_code=trust_remote_code).image_seq_length
        return InternVLImageOnlyProcessor(image_processor=GotOcr2ImageProcessorPil.from_pretrained(path),
                                          tokenizer=tokenizer, chat_template=saved_chat_template(path, tokenizer),
                                          image_seq_length=seq)


@register_tiny("internvl")
def build_tiny_internvl(image_size: int = 32, patch_size: int = 8, max_tiles: int = 4, hidden: int = 64,
                        vision_hidden: int = 32, layers: int = 2, seed: int = 0):
    """Random-init InternVL-architecture model (InternViT with CLS, pixel shuffle, MLP projector,
    Qwen2 decoder) + image-only processor, offline. A 32x32 tile has 4x4 patches, shuffled to 4
    features; a 64x64 image becomes 2x2 tiles + thumbnail = 20 features (22 ids)."""
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    tok = build_tiny_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_NAMED_TOKENS.values()],
                               bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               chat_template=INTERNVL_CHAT_TEMPLATE, named_tokens=INTERNVL_NAMED_TOKENS)
    seq = (image_size // patch_size) ** 2 // 4
    image_processor = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, min_patches=1,
                                               max_patches=max_tiles)
    processor = InternVLImageOnlyProcessor(image_processor=image_processor, tokenizer=tok,
                                           chat_template=INTERNVL_CHAT_TEMPLATE, image_seq_length=seq)
    vision = dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=2, image_size=[image_size, image_size], patch_size=[patch_size, patch_size])
    text = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            image_seq_length=seq, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model, processor
