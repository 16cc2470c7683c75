"""Tiny models of the kinds the "What works, per family" table of docs/MODELS.md has rows for
beyond ``families()``: tests parametrised by kind build them with :func:`build_kind`."""

from __future__ import annotations

import torch

from vlmalign.models import build_tiny


def build_kind(kind: str, seed: int = 0):
    """(model, processor) of a tiny random-init model of ``kind``: a family of ``families()``;
    ``vlmalign_resampler:<projector>``, the composed model with that projector (``linear`` and
    ``mlp2x_gelu`` give LLaVA models, models/compose.py); ``generic``, a model_type with no
    adapter of its own (:func:`build_tiny_generic`); ``fast_vlm`` or ``timm_vit``, a composed timm
    CNN or ViT tower (:func:`build_tiny_fast_vlm`, :func:`build_tiny_timm_vit`; they need timm: the
    side environment of timm_env.py)."""
    if kind == "generic":
        return build_tiny_generic(seed=seed)
    if kind == "fast_vlm":
        return build_tiny_fast_vlm(seed=seed)
    if kind == "timm_vit":
        return build_tiny_timm_vit(seed=seed)
    family, _, projector = kind.partition(":")
    return build_tiny(family, seed=seed, **({"projector": projector} if projector else {}))


def build_tiny_generic(seed: int = 0, image_size: int = 64, patch_size: int = 16, hidden: int = 64):
    """(model, processor) of a tiny random-init VipLLaVA (``vipllava``), a model_type no adapter
    claims: the generic fallback adapter (models/generic.py) serves it."""
    from transformers import LlavaProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration

    from vlmalign.models.llava import (LLAVA_CHAT_TEMPLATE, tiny_clip_image_processor, tiny_clip_vision_config,
                                       tiny_llama_config)
    from vlmalign.models.tiny_tokenizer import build_tiny_tokenizer
    tok = build_tiny_tokenizer(["<image>", "<s>", "</s>", "<pad>", "<unk>"], bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", unk_token="<unk>", chat_template=LLAVA_CHAT_TEMPLATE)
    config = VipLlavaConfig(vision_config=tiny_clip_vision_config(image_size, patch_size, hidden),
                            text_config=tiny_llama_config(len(tok), hidden, tok),
                            image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layers=[-2, -1],
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = VipLlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(image_processor=tiny_clip_image_processor(image_size), tokenizer=tok,
                               patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    return model, processor


def build_tiny_fast_vlm(seed: int = 0, image_size: int = 64, hidden: int = 64):
    """(model, processor) of a tiny random-init FastVLM (``fast_vlm``) as compose makes it from a timm
    tower: timm's ``test_efficientnet`` (BatchNorm, stride 32: 2x2 image tokens at 64 px) + a tiny
    ChatML Llama + LLaVA-1.5's mlp2x_gelu projector. Needs timm (timm_env.py)."""
    from transformers import TimmWrapperConfig, TimmWrapperModel

    from vlmalign.models.compose import ComposeOptions, compose_model, tiny_chatml_llm
    from vlmalign.models.llava import tiny_clip_image_processor
    torch.manual_seed(seed)
    tower = TimmWrapperModel(TimmWrapperConfig(architecture="test_efficientnet")).eval()
    lm, tok = tiny_chatml_llm(hidden, seed=seed)
    return compose_model(tower, tiny_clip_image_processor(image_size), lm, tok, ComposeOptions(seed=seed))


def build_tiny_timm_vit(seed: int = 0, hidden: int = 64):
    """(model, processor) of a tiny random-init LLaVA (``llava``) holding timm's ``test_vit`` as our
    ``vlmalign_timm_vit`` tower (160 px, patch 16: 100 image tokens, CLS dropped) + a tiny ChatML
    Llama + the mlp2x_gelu projector, as compose makes it. Needs timm (timm_env.py)."""
    from transformers import TimmWrapperConfig, TimmWrapperModel

    from vlmalign.models.compose import ComposeOptions, compose_model, tiny_chatml_llm
    from vlmalign.models.timm_towers import as_timm_vit
    from vlmalign.models.llava import tiny_clip_image_processor
    torch.manual_seed(seed)
    tower = as_timm_vit(TimmWrapperModel(TimmWrapperConfig(architecture="test_vit")).eval(), 160, "test_vit")
    lm, tok = tiny_chatml_llm(hidden, seed=seed)
    return compose_model(tower, tiny_clip_image_processor(160), lm, tok, ComposeOptions(seed=seed))
