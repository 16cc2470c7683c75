"""LLaVA-1.5 (``llava``): CLIP vision tower -> 2-layer MLP projector -> Llama/Vicuna.

Quirks handled here: the llava-hf chat template puts no EOS after assistant turns (the base
tokenization adds one, see ``VLMAdapter._ensure_eos``); the image becomes
``(size / patch)^2`` placeholder tokens (CLS dropped with the "default" feature strategy).
"""

from __future__ import annotations

from .adapter import VLMAdapter
from .registry import register, register_tiny
from .tiny_tokenizer import build_tiny_tokenizer

# LLaVA-1.5 (vicuna_v1) conversation layout with images in place and EOS closing each answer.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@register
class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_types = ("llava",)
    placeholder_token = "<image>"
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.multi_modal_projector.",)
    encoder_keys = ("pixel_values",)


def tiny_clip_vision_config(image_size: int, patch_size: int, hidden: int, layers: int = 2):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                            num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                            projection_dim=hidden)


def tiny_llama_config(vocab_size: int, hidden: int, tok, layers: int = 2, init_std: float | None = None,
                      heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig
    extra = {} if init_std is None else {"initializer_range": init_std}
    return LlamaConfig(**extra, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)


def tiny_clip_image_processor(image_size: int):
    from transformers import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


@register_tiny("llava")
def build_tiny_llava(image_size: int = 64, patch_size: int = 16, hidden: int = 64, seed: int = 0,
                     layers: int = 2, vision_hidden: int | None = None, vision_layers: int = 2,
                     init_std: float | None = None, heads: int = 4, kv_heads: int = 2,
                     vision_feature_layer: int = -1):
    """Random-init LLaVA-1.5-architecture model + processor, fully offline.

    ``init_std`` sets the language model's ``initializer_range`` (default: transformers' 0.02,
    tuned for widths in the thousands). For width-64 models 1/sqrt(width) = 0.125 learned
    ShapesWorld VQA faster (measured with scripts/learnability.py; the quickstart uses it).

    ``vision_feature_layer``: the vision tower's hidden state the projector reads, as in
    LLaVA's config (-1: the last layer; 0: the patch embeddings, before any attention layer).
    A random-init tower's attention layers mix every patch into every other; its patch
    embeddings keep each patch's colour and place, and the quickstart's SFT learned ShapesWorld
    far more reliably from them (README, Quickstart). Layer k >= 0 is stored as the equal
    negative index k - (vision_layers + 1): transformers 5.25 captures no hidden states for a
    layer index of 0 (it passes the index on as ``output_hidden_states``, and 0 is false).
    """
    if not -(vision_layers + 1) <= vision_feature_layer <= vision_layers:
        raise ValueError(f"vision_feature_layer {vision_feature_layer}: the tower has {vision_layers} layers "
                         f"(hidden states 0..{vision_layers}, or -1..-{vision_layers + 1})")
    if vision_feature_layer >= 0:
        vision_feature_layer -= vision_layers + 1
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = build_tiny_tokenizer(["<image>", "<s>", "</s>", "<pad>", "<unk>"], bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", unk_token="<unk>", chat_template=LLAVA_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=tiny_clip_vision_config(image_size, patch_size, vision_hidden or hidden, vision_layers),
        text_config=tiny_llama_config(len(tok), hidden, tok, layers, init_std, heads, kv_heads),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=vision_feature_layer,
        projector_hidden_act="gelu", pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Fan-in init for the projector: with the default std 0.02 a width-64 projector outputs image
    # features ~0.01 in size, and a random-init model spends hundreds of steps before it starts
    # to use them (measured on ShapesWorld); std = 1/sqrt(fan_in) keeps them at unit scale.
    with torch.no_grad():
        for mod in model.model.multi_modal_projector.modules():
            if isinstance(mod, torch.nn.Linear):
                torch.nn.init.normal_(mod.weight, std=mod.in_features ** -0.5)
    processor = LlavaProcessor(image_processor=tiny_clip_image_processor(image_size), tokenizer=tok,
                               patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, processor
