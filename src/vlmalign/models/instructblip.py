"""InstructBLIP (``instructblip``): ViT -> Q-Former (reads the instruction) -> linear -> LM.

Quirks handled here:

* **The image encoding depends on the text.** The Q-Former's learned queries attend to the
  image *and* to the instruction (``qformer_input_ids``, tokenized by a second, BERT-style
  tokenizer), so "encode each image once" means once per (image, instruction). That is still
  once for chosen, rejected, policy, reference and every rollout of a record, since they share
  the prompt. ``encoding_uses_prompt`` is True: ``encode_images(items, prompts=[...])`` needs
  one prompt per image (the messages that hold the image, or a string used verbatim as the
  processor would), and callers that share encodings across records key them on
  ``(image, image_prompt(prompt))``. Without prompts ``encode_images`` raises, rather than
  silently encoding with an empty instruction.
* **Which text is the instruction.** ``image_prompt(messages)`` is the text of the user turn
  that holds the image (its text parts, joined by a space, stripped) - what InstructBLIP was
  trained with (the instruction, never the answer). Later turns of a multi-turn conversation
  reuse that encoding.
* **Image tokens go first, not where the image is.** The processor prepends
  ``num_query_tokens`` image tokens before everything (even BOS) and the chat template renders
  no placeholder (``placeholders_in_text`` is False): tokenization prepends the image's
  expansion to the rendered text. One image per sample (``max_images`` = 1); text that
  contains the image token itself is rejected.
* **Features.** ``get_image_features(...).pooler_output`` is ``(n_images, num_query_tokens,
  hidden)``; the model reads ``pooler_output``, ``qformer_outputs`` and ``vision_outputs`` from
  ``mm_encoder_outputs["image"]``, so ``mm_kwargs`` hands it a
  ``BaseModelOutputWithVisionQformerOutputs`` with the features of the rows' images
  concatenated in order (and the other two None), plus ``pixel_values=None`` and
  ``qformer_input_ids=None`` (required positional arguments of the forward). A batch without
  images gets an empty feature tensor, so text-only rows work.
* **Generation.** ``InstructBlipForConditionalGeneration.generate`` always re-encodes from
  ``pixel_values``; ``generate`` here scatters precomputed features into the input embeddings
  and calls the language model's ``generate`` (what the HF method does after encoding). Its
  output is prompt + new ids like every adapter's (the prompt is put in front where the
  language model's generate from embeddings returns only the new ids).
* **Chat template.** Salesforce checkpoints ship none, and ``InstructBlipProcessor`` drops a
  ``chat_template`` given to it (also on reload), so the adapter restores the tokenizer's
  template, else uses the Vicuna ``USER: ... ASSISTANT:`` layout below.
* **Parameter groups** (the LM is a full ``*ForCausalLM`` under ``language_model``):
  vision = ``vision_model.``; projector = ``qformer.``, ``query_tokens``,
  ``language_projection.`` (the whole bridge); head = ``language_model.lm_head.``;
  language = ``language_model.model.``.
* **dtype.** ``query_tokens`` is kept in fp32 (``_keep_in_fp32_modules``) and is the first
  parameter, so the vision inputs are cast to the vision tower's dtype, not the first one's.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data.schema import ImagePart, Message, TextPart
from ..errors import DataError, ModelError
from .adapter import IGNORE_INDEX, EncodedImages, ImageInputs, Tokenized, VLMAdapter
from .llava import tiny_llama_config
from .registry import register, register_tiny
from .tiny_tokenizer import build_tiny_tokenizer

# Vicuna layout (InstructBLIP-Vicuna's LM) with EOS closing every answer; images render nothing
# because the processor puts the image's query tokens before BOS.
INSTRUCTBLIP_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@register
class InstructBlipAdapter(VLMAdapter):
    family = "instructblip"
    model_types = ("instructblip",)
    prefill_sharing = False     # its generate prepends the query tokens' embeddings itself
    # the model turns a missing attention mask into a 2-D one of ones, which switches off
    # transformers' packed-sequence detection: packed rows get our 4-D block-diagonal mask
    packing_attention = "mask"
    placeholder_token = "<image>"
    vision_prefixes = ("vision_model.",)
    projector_prefixes = ("qformer.", "query_tokens", "language_projection.")
    # read by the image encoding outside every module's forward: unsharded under FSDP2
    replicated_params = ("query_tokens",)
    head_prefixes = ("language_model.lm_head.",)
    encoder_keys = ("pixel_values",)
    encoding_uses_prompt = True
    max_images = 1
    placeholders_in_text = False

    def __init__(self, model, processor):
        if getattr(processor, "chat_template", None) is None:
            # InstructBlipProcessor.__init__ drops ``chat_template`` (also when loading a saved
            # one); take the tokenizer's, else the Vicuna layout (Salesforce checkpoints ship none).
            processor.chat_template = getattr(processor.tokenizer, "chat_template", None) \
                or INSTRUCTBLIP_CHAT_TEMPLATE
        super().__init__(model, processor)
        self.qformer_tokenizer = processor.qformer_tokenizer
        self.num_query_tokens = model.config.num_query_tokens

    # ------------------------------------------------------------------ images
    def preprocess_image(self, image) -> ImageInputs:
        """(1, 3, H, W) pixels; the expansion is ``num_query_tokens`` image tokens."""
        pixel_values = self.processor.image_processor(image, return_tensors="pt")["pixel_values"]
        expansion = [self.image_token_id] * self.num_query_tokens
        return ImageInputs(tensors={"pixel_values": pixel_values}, expansion=expansion,
                           num_features=self.num_query_tokens)

    def image_prompt(self, prompt: str | Sequence[Message] | None) -> str | None:
        """The Q-Former instruction: a string verbatim, or the text of the first message that
        holds an image (text parts joined by a space, stripped)."""
        if prompt is None:
            return None
        if isinstance(prompt, str):
            return prompt
        for m in prompt:
            if any(isinstance(p, ImagePart) for p in m.content):
                return " ".join(p.text.strip() for p in m.content
                                if isinstance(p, TextPart) and p.text.strip())
        raise DataError("no message holds an image, so there is no instruction for the Q-Former",
                        field="messages")

    def _encoder_text_inputs(self, prompts, n: int) -> dict[str, torch.Tensor]:
        if prompts is None:
            raise ModelError("instructblip: the image encoding depends on the instruction (Q-Former); "
                             "pass encode_images(items, prompts=[...]) with one prompt per image")
        if isinstance(prompts, str) or len(prompts) != n:
            raise ModelError(f"instructblip: need one prompt per image ({n}), got "
                             f"{'a string' if isinstance(prompts, str) else len(prompts)}")
        texts = [self.image_prompt(p) for p in prompts]
        tok = self.qformer_tokenizer
        max_len = self.model.config.qformer_config.max_position_embeddings
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {"qformer_input_ids": enc["input_ids"], "qformer_attention_mask": enc["attention_mask"]}

    def _encode(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        batch = dict(batch)
        batch["pixel_values"] = batch["pixel_values"].to(self.model.vision_model.dtype)
        out = self.model.get_image_features(**batch, return_dict=True)
        return list(out.pooler_output)  # each (num_query_tokens, hidden)

    def _features(self, encoded: EncodedImages | None, indices: Sequence[int]) -> torch.Tensor:
        if encoded is not None and len(indices):
            return torch.cat([encoded.features[i] for i in indices], dim=0)  # (n * Nq, hidden)
        hidden = self.model.config.text_config.hidden_size
        emb = self.model.get_input_embeddings().weight
        return emb.new_zeros(0, hidden)

    def kv_cache(self, output):
        """The language model's cache (InstructBLIP nests the text model's outputs)."""
        return getattr(getattr(output, "language_model_outputs", None), "cache", None)

    def mm_kwargs(self, encoded: EncodedImages | None, indices: Sequence[int]) -> dict[str, Any]:
        from transformers.models.instructblip.modeling_instructblip import BaseModelOutputWithVisionQformerOutputs
        feats = self._features(encoded, indices)
        return {"pixel_values": None, "qformer_input_ids": None,
                "mm_encoder_outputs": {"image": BaseModelOutputWithVisionQformerOutputs(pooler_output=feats)}}

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 encoded: EncodedImages | None = None, image_indices: Sequence[Sequence[int]] = (),
                 **generate_kwargs) -> torch.Tensor:
        flat = [i for row in image_indices for i in row]
        embeds = self.model.get_input_embeddings()(input_ids)           # (B, T, hidden)
        feats = self._features(encoded, flat).to(embeds.device, embeds.dtype)
        mask = input_ids == self.image_token_id                          # (B, T)
        if int(mask.sum()) != feats.shape[0]:
            raise ModelError(f"instructblip: {int(mask.sum())} image tokens but {feats.shape[0]} features")
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.model.language_model.generate(input_ids=input_ids, inputs_embeds=embeds,
                                                 attention_mask=attention_mask, **generate_kwargs)
        return self._with_prompt(out, input_ids)

    @staticmethod
    def _with_prompt(out: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``out`` as prompt + new ids: a generate from embeddings may return the new ids only."""
        n = input_ids.shape[1]
        if out.shape[1] >= n and torch.equal(out[:, :n], input_ids):
            return out
        return torch.cat([input_ids.to(out.device), out], dim=1)

    # ------------------------------------------------------------------ text
    def tokenize_messages(self, messages: Sequence[Message], images: Sequence[ImageInputs], *,
                          add_generation_prompt: bool = False, max_length: int | None = None) -> Tokenized:
        n_parts = sum(1 for m in messages for p in m.content if isinstance(p, ImagePart))
        if n_parts != len(images):
            raise DataError(f"placeholder count {n_parts} differs from image count {len(images)}",
                            field="images")
        if len(images) > self.max_images:
            raise DataError(f"instructblip takes at most {self.max_images} image per sample, got {len(images)}",
                            field="images")
        return super().tokenize_messages(messages, images, add_generation_prompt=add_generation_prompt,
                                         max_length=max_length)

    def _expand(self, ids: list[int], labels: list[int], images: Sequence[ImageInputs]):
        """Prepend the image's query tokens (before BOS), as InstructBlipProcessor does."""
        if self.image_token_id in ids:
            raise DataError(f"text contains the image token {self.placeholder_token!r}; InstructBLIP "
                            "places image tokens itself", field="messages")
        prefix = [t for im in images for t in im.expansion]
        return prefix + ids, [IGNORE_INDEX] * len(prefix) + labels


def tiny_blip_image_processor(image_size: int):
    from transformers import BlipImageProcessorPil
    return BlipImageProcessorPil(size={"height": image_size, "width": image_size})


def build_tiny_qformer_tokenizer(bert_like: bool = False):
    """A small BERT-style tokenizer for the Q-Former ([PAD] first, so its id is 0 as in BERT).

    ``bert_like`` adds BERT's ``[CLS] ... [SEP]`` post-processing (real InstructBLIP uses
    bert-base-uncased); the default adds nothing, like the LM's tiny tokenizer.
    """
    tok = build_tiny_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], eos_token="[SEP]",
                               pad_token="[PAD]", unk_token="[UNK]", extra_attrs=None)
    tok.cls_token, tok.sep_token, tok.mask_token = "[CLS]", "[SEP]", "[MASK]"
    if bert_like:
        from tokenizers import processors
        cls_id, sep_id = tok.convert_tokens_to_ids("[CLS]"), tok.convert_tokens_to_ids("[SEP]")
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tok


@register_tiny("instructblip")
def build_tiny_instructblip(image_size: int = 32, patch_size: int = 8, hidden: int = 64,
                            qformer_hidden: int = 32, num_query_tokens: int = 8, seed: int = 0,
                            bert_like_qformer_tokenizer: bool = False):
    """Random-init InstructBLIP (decoder-only tiny Llama LM) + processor, fully offline."""
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor,
                              InstructBlipQFormerConfig, InstructBlipVisionConfig)

    tok = build_tiny_tokenizer(["<image>", "<s>", "</s>", "<pad>", "<unk>"], bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", unk_token="<unk>", chat_template=INSTRUCTBLIP_CHAT_TEMPLATE)
    qtok = build_tiny_qformer_tokenizer(bert_like=bert_like_qformer_tokenizer)
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=qformer_hidden, intermediate_size=qformer_hidden * 2, num_hidden_layers=2,
            num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qtok), hidden_size=qformer_hidden, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=qformer_hidden * 2, cross_attention_frequency=1, max_position_embeddings=128,
            pad_token_id=qtok.pad_token_id),
        text_config=tiny_llama_config(len(tok), hidden, tok),
        num_query_tokens=num_query_tokens,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    processor = InstructBlipProcessor(image_processor=tiny_blip_image_processor(image_size), tokenizer=tok,
                                      qformer_tokenizer=qtok, num_query_tokens=num_query_tokens,
                                      chat_template=INSTRUCTBLIP_CHAT_TEMPLATE)
    processor.chat_template = INSTRUCTBLIP_CHAT_TEMPLATE  # InstructBlipProcessor.__init__ drops it
    for gc in (model.generation_config, model.language_model.generation_config):
        gc.pad_token_id = tok.pad_token_id
        gc.eos_token_id = tok.eos_token_id
        gc.bos_token_id = tok.bos_token_id
    return model, processor
