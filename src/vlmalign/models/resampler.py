"""A LLaVA with a resampler projector (``model_type`` ``vlmalign_resampler``).

transformers has no model class that holds an arbitrary vision tower, an arbitrary causal LM and a
query-token resampler between them (Idefics2's perceiver and BLIP-2's Q-Former come with their own
fixed towers), so ``vlmalign models compose --projector perceiver|qformer`` writes this small class
of ours: LLaVA's model and processor with the projector replaced by a resampler that turns the
tower's N feature vectors into ``num_query_tokens`` learned queries' outputs. Registered with
AutoConfig / AutoModel / AutoModelForImageTextToText / AutoProcessor when ``vlmalign.models`` is
imported, so ``from_pretrained`` loads a saved one offline, without remote code.

* ``perceiver`` (Flamingo's Perceiver Resampler): per layer the latents attend to the image
  features and to themselves together (keys/values = features + latents), then an MLP.
* ``qformer`` (a BLIP-2 Q-Former without the text branch): per layer the queries attend to each
  other, then cross-attend to the image features, then an MLP.

Pre-norm residual blocks; features are first mapped to the language model's width; a final
LayerNorm and linear map give the language model's embeddings. The image becomes exactly
``num_query_tokens`` ``<image>`` tokens whatever its size (``VlmalignResamplerProcessor``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel
from transformers.models.llava.configuration_llava import LlavaConfig
from transformers.models.llava.modeling_llava import (LlavaForConditionalGeneration, LlavaModel,
                                                      LlavaPreTrainedModel)
from transformers.models.llava.processing_llava import LlavaProcessor

MODEL_TYPE = "vlmalign_resampler"
PROJECTORS = ("perceiver", "qformer")


class VlmalignResamplerConfig(LlavaConfig):
    model_type = MODEL_TYPE
    projector_type: str = "perceiver"
    num_query_tokens: int = 64
    resampler_layers: int = 2
    resampler_heads: int = 0     # 0: the width / 64 (at least 1)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.projector_type not in PROJECTORS:
            raise ValueError(f"projector_type {self.projector_type!r}: choose from {', '.join(PROJECTORS)}")


def _heads(width: int, asked: int) -> int:
    if asked:
        return asked
    heads = max(width // 64, 1)
    while width % heads:
        heads -= 1
    return heads


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.o_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x, kv):
        b, n, d = x.shape
        split = lambda t: t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(kv)), split(self.v_proj(kv)))
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, kind: str):
        super().__init__()
        self.kind = kind
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross = _Attention(width, heads)
        if kind == "qformer":
            self.norm_self = nn.LayerNorm(width)
            self.self_attn = _Attention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, q, feats):
        if self.kind == "qformer":
            h = self.norm_self(q)
            q = q + self.self_attn(h, h)
            h = self.norm_q(q)
            q = q + self.cross(h, self.norm_kv(feats))
        else:   # perceiver: keys and values are the features and the latents together
            h = self.norm_q(q)
            q = q + self.cross(h, torch.cat([self.norm_kv(feats), h], dim=1))
        return q + self.mlp(self.norm_mlp(q))


class Resampler(nn.Module):
    """(batch, N, vision width) -> (batch, num_query_tokens, text width)."""

    def __init__(self, config: VlmalignResamplerConfig):
        super().__init__()
        width = config.text_config.hidden_size
        layers = config.vision_feature_layer
        n_layers = 1 if isinstance(layers, int) else len(layers)
        heads = _heads(width, config.resampler_heads)
        self.input_proj = nn.Linear(config.vision_config.hidden_size * n_layers, width)
        self.queries = nn.Parameter(torch.zeros(config.num_query_tokens, width))
        self.blocks = nn.ModuleList(_Block(width, heads, config.projector_type)
                                    for _ in range(config.resampler_layers))
        self.norm_out = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, width)

    def forward(self, image_features):
        feats = self.input_proj(image_features)
        q = self.queries.unsqueeze(0).expand(feats.shape[0], -1, -1).to(feats.dtype)
        for block in self.blocks:
            q = block(q, feats)
        return self.output_proj(self.norm_out(q))


class _InitQueries:
    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Resampler):   # skipped where loaded from a checkpoint (_is_hf_initialized)
            from transformers import initialization as init
            init.normal_(module.queries, std=module.queries.shape[-1] ** -0.5)


class VlmalignResamplerModel(_InitQueries, LlavaModel):
    config_class = VlmalignResamplerConfig

    def __init__(self, config: VlmalignResamplerConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = Resampler(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()


class VlmalignResamplerForConditionalGeneration(_InitQueries, LlavaForConditionalGeneration):
    config_class = VlmalignResamplerConfig

    def __init__(self, config: VlmalignResamplerConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = VlmalignResamplerModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


class VlmalignResamplerProcessor(LlavaProcessor):
    """LLaVA's processor, with every image ``num_query_tokens`` image tokens."""

    def __init__(self, image_processor=None, tokenizer=None, num_query_tokens: int = 64, chat_template=None,
                 image_token="<image>", **kwargs):
        self.num_query_tokens = num_query_tokens
        super().__init__(image_processor, tokenizer, chat_template=chat_template, image_token=image_token, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_query_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        from transformers.processing_utils import MultiModalData
        if image_sizes is None:
            return MultiModalData()
        n = len(image_sizes)
        return MultiModalData(num_image_tokens=[self.num_query_tokens] * n, num_image_patches=[1] * n)


def register() -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    AutoConfig.register(MODEL_TYPE, VlmalignResamplerConfig, exist_ok=True)
    AutoModel.register(VlmalignResamplerConfig, VlmalignResamplerModel, exist_ok=True)
    AutoModelForImageTextToText.register(VlmalignResamplerConfig, VlmalignResamplerForConditionalGeneration,
                                         exist_ok=True)
    AutoProcessor.register(VlmalignResamplerConfig, VlmalignResamplerProcessor, exist_ok=True)
