"""Idefics3 (``idefics3``) and SmolVLM (``smolvlm``): SigLIP-style vision tower -> pixel-shuffle
connector -> Llama-style decoder.

SmolVLM is the Idefics3 architecture (its modeling classes subclass Idefics3's; only the
placeholder scatter is written differently) with a different processor, so one adapter serves
both model types. Quirks handled here:

* **Image splitting.** With ``do_image_splitting`` the image processor resizes an image so its
  longest edge is ``size["longest_edge"]``, cuts it into ``rows x cols`` square sub-images of
  ``max_image_size`` and appends a downscaled global view; without it, the image becomes one
  sub-image. ``pixel_values`` are ``(batch, n_subimages, 3, H, W)`` with a
  ``pixel_attention_mask`` of ``(batch, n_subimages, H, W)``; all-zero sub-images are padding
  and the model drops them. :meth:`Idefics3Adapter.collate_images` therefore zero-pads images
  with different sub-image counts (and sizes) into one batch.
* **Placeholder expansion.** Each ``<image>`` in the rendered text becomes
  ``<fake_token_around_image><row_r_col_c><image>*seq`` per sub-image (rows separated by ``\\n``),
  then ``\\n<fake_token_around_image><global-img><image>*seq<fake_token_around_image>``; an
  unsplit image is only the global part. ``seq = (image_size / patch)^2 / scale_factor^2``. The
  processor needs ``return_row_col_info=True`` to build it, which ``preprocess_image`` passes.
* **Features.** ``get_image_features(...).pooler_output`` is one ``(n_subimages_i * seq, hidden)``
  tensor per batch row, i.e. per original image when each row holds one image: exactly the
  features its ``<image>`` tokens receive, in order. The model's forward concatenates the
  ``mm_encoder_outputs["image"].pooler_output`` list and scatters it into the ``<image>``
  positions, so the base ``mm_kwargs`` already hands precomputed features over.
* **Chat template.** ``User:<image>Question<end_of_utterance>\\nAssistant: answer<end_of_utterance>\\n``
  (the real Idefics3/SmolVLM-Instruct layout). ``<end_of_utterance>`` closes every turn and is the
  tiny tokenizers' EOS, as in SmolVLM-Instruct. Idefics3-8B-Llama3's EOS is ``<|end_of_text|>``
  instead, and its config does not list ``<end_of_utterance>`` as a stop token; the adapter
  still treats ``<end_of_utterance>`` as the end of an answer: it closes the supervised span (no
  extra EOS is inserted after it) and :meth:`Idefics3Adapter.generate` stops on it.
* **SmolVLM's processor** requires a video processor (torchvision) and ``num2words``, neither
  needed for images. The tiny SmolVLM uses :class:`SmolVLMImageProcessorOnly`, a
  ``SmolVLMProcessor`` without the video part; :meth:`Idefics3Adapter.load_processor` falls back to
  it whenever ``AutoProcessor`` cannot load a directory (also real SmolVLM checkpoints here).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from ..errors import ModelError
from .adapter import ImageInputs, VLMAdapter, saved_chat_template
from .registry import register, register_tiny
from .tiny_tokenizer import build_tiny_tokenizer

# Idefics3-8B-Llama3 / SmolVLM-Instruct chat template (the BOS is a template variable so one
# template serves both tiny tokenizers; the real ones hard-code <|begin_of_text|> / <|im_start|>).
IDEFICS3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

IDEFICS3_SPECIAL_TOKENS = (["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
                           + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])


# ---------------------------------------------------------------------- SmolVLM image-only processor
def _smolvlm_image_only_class():
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class SmolVLMImageProcessorOnly(SmolVLMProcessor):
        """``SmolVLMProcessor`` without the video processor (torchvision) and ``num2words``.

        Same image processing, ``<image>`` expansion (``replace_image_token``) and chat template;
        saves as a normal processor directory.
        """

        def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169,
                     chat_template: str | None = None, **kwargs):
            # SmolVLMProcessor.__init__ insists on num2words (videos only): set its attributes here
            self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
            self.image_token = getattr(tokenizer, "image_token", "<image>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
            self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
            self.image_seq_len = image_seq_len
            self.video_token = None  # no video path: _process_videos is never reached
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            # SmolVLMProcessor's version reads video defaults from the (absent) video processor
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

        @property
        def model_input_names(self):
            names = list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
            return list(dict.fromkeys(names))

    SmolVLMImageProcessorOnly.__module__ = __name__
    return SmolVLMImageProcessorOnly


_SMOLVLM_IMAGE_ONLY: type | None = None


def smolvlm_image_only_processor_class() -> type:
    global _SMOLVLM_IMAGE_ONLY
    if _SMOLVLM_IMAGE_ONLY is None:
        _SMOLVLM_IMAGE_ONLY = _smolvlm_image_only_class()
    return _SMOLVLM_IMAGE_ONLY


# ---------------------------------------------------------------------- adapter
@register
class Idefics3Adapter(VLMAdapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    placeholder_token = "<image>"
    vision_prefixes = ("model.vision_model.",)
    projector_prefixes = ("model.connector.",)
    head_prefixes = ("lm_head.",)
    encoder_keys = ("pixel_values", "pixel_attention_mask")
    end_of_turn_token = "<end_of_utterance>"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        self.family = model.config.model_type
        eou = self.tokenizer.convert_tokens_to_ids(self.end_of_turn_token)
        self.end_of_turn_id: int | None = None if eou in (None, self.tokenizer.unk_token_id) else eou
        # the processor's expansion length must be what the connector produces per sub-image
        want = getattr(model.model, "image_seq_len", None)
        have = getattr(processor, "image_seq_len", None)
        if want is not None and have is not None and want != have:
            raise ModelError(f"{self.family}: processor image_seq_len {have} differs from the model's "
                             f"{want} ((image_size / patch_size)^2 / scale_factor^2)")

    # ------------------------------------------------------------------ loading
    @classmethod
    def _fallback_processor(cls, path: str, *, trust_remote_code: bool = False):
        """For SmolVLM without torchvision/num2words (or a directory saved with
        :class:`SmolVLMImageProcessorOnly`): the image-only processor. Idefics3 has none."""
        from .loading import read_config
        config = read_config(path, trust_remote_code=trust_remote_code)
        if config.model_type != "smolvlm":
            return None
        return cls._build_smolvlm_image_only(path, config)

    @staticmethod
    def _build_smolvlm_image_only(path: str, config):
        from transformers import AutoTokenizer, SmolVLMImageProcessorPil
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = SmolVLMImageProcessorPil.from_pretrained(path)
        vc = config.vision_config
        image_seq_len = int(((vc.image_size // vc.patch_size) ** 2) / (config.scale_factor ** 2))
        pc = os.path.join(path, "processor_config.json")
        if os.path.isfile(pc):
            with open(pc, encoding="utf-8") as f:
                image_seq_len = json.load(f).get("image_seq_len", image_seq_len)
        chat_template = saved_chat_template(path, tokenizer)
        return smolvlm_image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                                    image_seq_len=image_seq_len, chat_template=chat_template)

    # ------------------------------------------------------------------ end of turn
    def stop_token_ids(self) -> list[int]:
        """The generation config's EOS ids plus ``<end_of_utterance>``."""
        eos = self.model.generation_config.eos_token_id
        ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        if self.end_of_turn_id is not None and self.end_of_turn_id not in ids:
            ids.append(self.end_of_turn_id)
        return ids

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """As :meth:`VLMAdapter.generate`, stopping at the end of the assistant turn."""
        kwargs.setdefault("eos_token_id", self.stop_token_ids())
        return super().generate(input_ids, attention_mask, **kwargs)

    # ------------------------------------------------------------------ images
    def preprocess_image(self, image) -> ImageInputs:
        # rows/cols (the split grid) are needed to build the expansion, not by the model
        processed, reps = self.processor._process_images([image], return_tensors="pt", return_row_col_info=True)
        expansion = self.tokenizer(reps[0], add_special_tokens=False)["input_ids"]
        tensors = {k: processed[k] for k in self.encoder_keys if k in processed}
        if "pixel_attention_mask" not in tensors:  # do_pad=False: every pixel is real
            pv = tensors["pixel_values"]
            tensors["pixel_attention_mask"] = torch.ones(pv.shape[0], pv.shape[1], *pv.shape[-2:], dtype=torch.long)
        n_feat = sum(1 for t in expansion if t == self.image_token_id)
        return ImageInputs(tensors=tensors, expansion=expansion, num_features=n_feat)

    @staticmethod
    def num_subimages(item: ImageInputs) -> int:
        """Sub-images of one preprocessed image (rows * cols + 1 when split, else 1)."""
        return int(item.tensors["pixel_values"].shape[1])

    def collate_images(self, items: Sequence[ImageInputs]) -> dict[str, torch.Tensor]:
        """``(n_images, max_subimages, 3, H, W)`` pixel values + ``(n_images, max_subimages, H, W)``
        masks, zero-padded: the model skips all-zero sub-images and masks padded pixels, so each
        batch row yields exactly its own image's features."""
        n = len(items)
        S = max(self.num_subimages(it) for it in items)
        H = max(int(it.tensors["pixel_values"].shape[-2]) for it in items)
        W = max(int(it.tensors["pixel_values"].shape[-1]) for it in items)
        first = items[0].tensors
        C = int(first["pixel_values"].shape[2])
        pv = first["pixel_values"].new_zeros((n, S, C, H, W))
        pm = first["pixel_attention_mask"].new_zeros((n, S, H, W))
        for i, it in enumerate(items):
            p, m = it.tensors["pixel_values"][0], it.tensors["pixel_attention_mask"][0]
            s, h, w = p.shape[0], p.shape[-2], p.shape[-1]
            pv[i, :s, :, :h, :w] = p
            pm[i, :s, :h, :w] = m
        return {"pixel_values": pv, "pixel_attention_mask": pm}

    def _encode(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # pooler_output: one (n_subimages_i * seq, hidden) tensor per batch row (= per image)
        out = self.model.model.get_image_features(**batch, return_dict=True)
        feats = list(out.pooler_output)
        if len(feats) != batch["pixel_values"].shape[0]:
            raise ModelError(f"{self.family}: got features for {len(feats)} images, expected "
                             f"{batch['pixel_values'].shape[0]} (an image whose pixels are all zero?)")
        return feats


# ---------------------------------------------------------------------- tiny builders
def _tiny_parts(model_type: str, image_size: int, patch_size: int, scale_factor: int, hidden: int,
                vision_hidden: int, layers: int, image_splitting: bool, eos_token: str = "<end_of_utterance>"):
    from .llava import tiny_llama_config

    bos = "<|begin_of_text|>" if model_type == "idefics3" else "<|im_start|>"
    tok = build_tiny_tokenizer(IDEFICS3_SPECIAL_TOKENS, bos_token=bos, eos_token=eos_token,
                               pad_token="<pad>", chat_template=IDEFICS3_CHAT_TEMPLATE)
    seq = int(((image_size // patch_size) ** 2) / (scale_factor ** 2))
    vision = dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    text = tiny_llama_config(len(tok), hidden, tok, layers=layers)
    # the longest edge of a split image is 2 sub-images: a square ShapesWorld image -> 2x2 + global
    image_kwargs = dict(size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size},
                        do_image_splitting=image_splitting)
    return tok, seq, vision, text, image_kwargs


def _finish(model, tok):
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


@register_tiny("idefics3")
def build_tiny_idefics3(image_size: int = 32, patch_size: int = 4, scale_factor: int = 2, hidden: int = 64,
                        vision_hidden: int = 32, layers: int = 2, image_splitting: bool = False, seed: int = 0,
                        eos_token: str = "<end_of_utterance>"):
    """Random-init Idefics3-architecture model + processor, fully offline.

    A sub-image is ``image_size`` square and becomes ``(image_size/patch)^2/scale^2`` = 16
    ``<image>`` tokens; ``image_splitting=True`` turns a square image into 2x2 sub-images + a
    global view (5 x 16 tokens). ``eos_token="<|end_of_text|>"`` mimics Idefics3-8B-Llama3,
    whose EOS is not the end-of-turn token.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

    tok, seq, vision, text, image_kwargs = _tiny_parts("idefics3", image_size, patch_size, scale_factor, hidden,
                                                       vision_hidden, layers, image_splitting, eos_token)
    config = Idefics3Config(vision_config=vision, text_config=text.to_dict(), scale_factor=scale_factor,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = _finish(Idefics3ForConditionalGeneration(config).eval(), tok)
    processor = Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**image_kwargs), tokenizer=tok,
                                  image_seq_len=seq, chat_template=IDEFICS3_CHAT_TEMPLATE)
    return model, processor


@register_tiny("smolvlm")
def build_tiny_smolvlm(image_size: int = 32, patch_size: int = 4, scale_factor: int = 2, hidden: int = 64,
                       vision_hidden: int = 32, layers: int = 2, image_splitting: bool = False, seed: int = 0):
    """Random-init SmolVLM-architecture model + image-only SmolVLM processor, fully offline."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    tok, seq, vision, text, image_kwargs = _tiny_parts("smolvlm", image_size, patch_size, scale_factor, hidden,
                                                       vision_hidden, layers, image_splitting)
    config = SmolVLMConfig(vision_config=vision, text_config=text.to_dict(), scale_factor=scale_factor,
                           image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = _finish(SmolVLMForConditionalGeneration(config).eval(), tok)
    processor = smolvlm_image_only_processor_class()(
        image_processor=SmolVLMImageProcessorPil(**image_kwargs), tokenizer=tok, image_seq_len=seq,
        chat_template=IDEFICS3_CHAT_TEMPLATE)
    return model, processor
