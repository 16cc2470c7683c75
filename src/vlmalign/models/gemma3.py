"""Gemma 3 (``gemma3``): SigLIP tower -> projector (average pooling to ``mm_tokens_per_image``,
RMSNorm, linear) -> Gemma 3 decoder (sliding-window and global layers, tied output head).

Quirks handled here:

* **Placeholder != feature token.** The chat template renders ``<start_of_image>`` (the
  tokenizer's ``boi_token``) per image; the processor replaces it by
  ``\\n\\n<start_of_image>`` + ``<image_soft_token>`` x ``mm_tokens_per_image`` +
  ``<end_of_image>\\n\\n``. Features go to the soft tokens (``config.image_token_id``).
* **Expansion in the text.** The replacement starts and ends with newlines, which a real Gemma
  tokenizer merges with the newlines around the placeholder (``user\\n`` + ``\\n\\n`` is one
  ``\\n\\n\\n`` token). So :meth:`Gemma3Adapter.tokenize_messages` puts the replacement strings
  into the rendered text and tokenizes that once, as the processor does, instead of splicing
  separately tokenized expansion ids. ``ImageInputs.num_tokens`` is the expansion tokenized
  alone: the length check uses the real sequence length.
* **Bidirectional attention over image tokens.** The decoder attends bidirectionally within each
  image's soft-token block when the forward gets ``token_type_ids`` (1 on soft tokens, which is
  what the processor returns); without them it is causal everywhere and the logits differ from
  the model's own. ``_extra_forward_kwargs`` always derives them from the ids, for training
  forwards and for ``generate`` (which uses them on the prefill only).
* **Pan-and-scan** (off in the released configs and in the processor's call defaults, which
  ``adapter.image_kwargs`` follows; ``tiles.py``): an image becomes the full view plus crops,
  each a ``pixel_values`` row with its own soft-token block, encoded together and joined.
* **Prefix sharing** is off: sliding-window layers keep no plain growing cache (the method layer
  would fall back anyway) and the image blocks' attention is not causal.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import DataError, ModelError
from ..data.schema import Message
from .adapter import IGNORE_INDEX, ImageInputs, Tokenized, VLMAdapter
from .registry import register, register_tiny
from .tiles import TiledImages
from .tiny_tokenizer import build_tiny_tokenizer

# Gemma 3 instruction-tuned chat template layout: <bos>, turns as <start_of_turn>user|model\n ...
# <end_of_turn>\n, system text in front of the first user turn, text parts trimmed, images as
# <start_of_image>; the generation prompt is <start_of_turn>model\n.
GEMMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(prefix='') -%}"
    "{%- set loop_messages = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set c = messages[0]['content'] -%}"
    "{%- set ns.prefix = (c if c is string else c[0]['text']) + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (ns.prefix if loop.first else '') -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<start_of_image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

GEMMA3_SPECIAL_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>",
                         "<end_of_turn>"]


@register
class Gemma3Adapter(TiledImages, VLMAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    placeholder_token = "<start_of_image>"
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.multi_modal_projector.",)
    head_prefixes = ("lm_head.",)
    encoder_keys = ("pixel_values",)
    prefix_sharing = False
    # measured: packed loss 4e-5 and gradients 8e-3 away from the unpacked run (tests/integration/test_sft_packing.py)
    packing_refused = ("the model builds its own mask from token_type_ids (bidirectional over each image block, "
                       "sliding windows), which does not restart at packed samples")
    prefix_sharing_note = ("sliding-window layers keep no plain growing cache and image blocks "
                           "attend bidirectionally")

    # ------------------------------------------------------------------ attention
    def token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 on image soft tokens (bidirectional blocks), 0 elsewhere, as the processor returns."""
        return (input_ids == self.image_token_id).long()

    def _extra_forward_kwargs(self, input_ids, attention_mask, mm) -> dict:
        if "token_type_ids" in mm:  # the processor's own (pixel_inputs)
            return {}
        return {"token_type_ids": self.token_type_ids(input_ids)}

    # ------------------------------------------------------------------ text
    def tokenize_messages(self, messages: Sequence[Message], images: Sequence[ImageInputs], *,
                          add_generation_prompt: bool = False, max_length: int | None = None) -> Tokenized:
        """As the base, with each placeholder replaced by its replacement string before tokenizing."""
        full = self.render(messages, add_generation_prompt=add_generation_prompt)
        parts = full.split(self.placeholder_token)
        if len(parts) - 1 != len(images):
            raise DataError(f"placeholder count {len(parts) - 1} differs from image count {len(images)}",
                            field="images")
        answered = any(m.role == "assistant" for m in messages) and not add_generation_prompt
        spans = self._assistant_spans(messages, full) if answered else []
        # the expanded text, and where each placeholder of ``full`` started / how much it grew
        text, cuts, pos = parts[0], [], len(parts[0])
        for im, part in zip(images, parts[1:]):
            rep = im.text if im.text is not None else self.placeholder_token
            cuts.append((pos, len(rep) - len(self.placeholder_token)))
            text += rep + part
            pos += len(self.placeholder_token) + len(part)

        def moved(c: int) -> int:
            return c + sum(grow for at, grow in cuts if at < c)

        spans = [(moved(a), moved(b)) for a, b in spans]
        ids, offsets = map(list, self._encode_text(text))
        tok_spans = []
        if answered:
            ids, offsets, tok_spans = self._ensure_eos(ids, offsets, spans)
        labels = [IGNORE_INDEX] * len(ids)
        for a, b in tok_spans:
            labels[a:b] = ids[a:b]
        n_feat = sum(1 for t in ids if t == self.image_token_id)
        if n_feat != sum(im.num_features for im in images):
            raise ModelError(f"gemma3: {n_feat} image tokens in the text for "
                             f"{sum(im.num_features for im in images)} features")
        out = Tokenized(ids, labels, len(images), [im.num_tokens for im in images])
        self._check_length(len(out), out.image_token_counts, max_length)
        return out


# ---------------------------------------------------------------------- tiny builder
@register_tiny("gemma3")
def build_tiny_gemma3(image_size: int = 32, patch_size: int = 8, tokens_per_image: int = 4, hidden: int = 64,
                      vision_hidden: int = 32, layers: int = 2, eos_token: str = "<end_of_turn>", seed: int = 0):
    """Random-init Gemma 3-architecture model (SigLIP, pooled projector, one sliding-window and
    one global layer, tied head) + the stock Gemma3Processor, offline. An image's 4x4 patches
    are average-pooled to ``tokens_per_image`` = 4 soft tokens (10 ids with the wrapper).
    ``eos_token="<eos>"`` mimics the real tokenizer (``<end_of_turn>`` then ends turns through
    the generation config's EOS list, as in gemma-3-*-it)."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3Processor, SiglipVisionConfig)

    tok = build_tiny_tokenizer(GEMMA3_SPECIAL_TOKENS + ["<eos>"], bos_token="<bos>", eos_token=eos_token,
                               pad_token="<pad>", unk_token="<unk>", chat_template=GEMMA3_CHAT_TEMPLATE,
                               named_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                             "image_token": "<image_soft_token>"})
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=GEMMA3_CHAT_TEMPLATE,
                                image_seq_length=tokens_per_image)
    ids = tok.convert_tokens_to_ids
    turn_ends = sorted({ids("<eos>"), ids("<end_of_turn>")})
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                                num_hidden_layers=layers, num_attention_heads=2, image_size=image_size,
                                patch_size=patch_size, vision_use_head=False)
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=1, head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4,
                sliding_window=16, layer_types=(["sliding_attention"] * (layers - 1) + ["full_attention"]),
                max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=turn_ends,
                pad_token_id=tok.pad_token_id)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=tokens_per_image,
                          boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                          image_token_index=ids("<image_soft_token>"), tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = turn_ends
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, processor
