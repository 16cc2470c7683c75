"""A timm ViT as a vision tower that LLaVA-style models read like a CLIP tower
(``model_type`` ``vlmalign_timm_vit``).

transformers' ``TimmWrapperModel`` gives a timm ViT's final tokens, and its per-block outputs only
as (B, C, H, W) maps (timm's ``forward_intermediates`` default), so LLaVA, which selects
``hidden_states[vision_feature_layer]`` and projects its last dimension, cannot hold one. This
class is ``TimmWrapperModel`` (same config fields, same weights under ``timm_model.``) whose
forward returns every block's output as tokens, (B, H*W, D), the prefix tokens (CLS, registers)
dropped: ``hidden_states[-1]`` is the last block's output, ``hidden_states[-2]`` the one before
(LLaVA-1.5's choice), and so on; the tuple holds the blocks only, so feature layers count from
the end. ``vlmalign models compose`` makes one of a timm tower whose ``forward_features`` gives
tokens (models/compose.py); timm CNNs compose as transformers' own FastVLM instead.

Registered with AutoConfig / AutoModel when ``vlmalign.models`` is imported (as the composed
model's ``vision_config``); building one needs the timm package.
"""

from __future__ import annotations

import torch
from transformers import TimmWrapperConfig, TimmWrapperModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "vlmalign_timm_vit"


class TimmViTConfig(TimmWrapperConfig):
    """TimmWrapper's config; compose also sets ``hidden_size`` (the width), ``patch_size`` and
    ``image_size`` (the input size its position embeddings fix)."""

    model_type = MODEL_TYPE


class TimmViTModel(TimmWrapperModel):
    config_class = TimmViTConfig
    # one FSDP2 unit, as TimmWrapperModel is: the forward below calls the timm model's
    # forward_intermediates, not its forward, so only this module's forward gathers the weights
    _no_split_modules = ["TimmViTModel"]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states=None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutputWithPooling:
        model = self.timm_model
        final, blocks = model.forward_intermediates(pixel_values.to(self.device, self.dtype), output_fmt="NLC",
                                                    norm=False, return_prefix_tokens=False)
        prefix = getattr(model, "num_prefix_tokens", 0)
        return BaseModelOutputWithPooling(last_hidden_state=final[:, prefix:], pooler_output=None,
                                          hidden_states=tuple(blocks))


def register() -> None:
    from transformers import AutoConfig, AutoModel
    AutoConfig.register(MODEL_TYPE, TimmViTConfig, exist_ok=True)
    AutoModel.register(TimmViTConfig, TimmViTModel, exist_ok=True)
