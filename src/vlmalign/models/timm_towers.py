"""timm vision towers in composed models (``vlmalign models compose``, models/compose.py).

* CNNs and hybrids (``forward_features`` gives a (B, C, H, W) map) compose as transformers' own
  FastVLM (``fast_vlm``): :func:`timm_feature_map` measures the stride, :class:`FastVlmAdapter`
  serves it, its BatchNorm kept in eval mode (:func:`batchnorm_stays_in_eval`).
* ViTs (``forward_features`` gives tokens) become :class:`TimmViTModel`
  (``model_type`` ``vlmalign_timm_vit``, :func:`as_timm_vit`), which LLaVA-style models read like
  a CLIP tower:

transformers' ``TimmWrapperModel`` gives a timm ViT's final tokens, and its per-block outputs only
as (B, C, H, W) maps (timm's ``forward_intermediates`` default), so LLaVA, which selects
``hidden_states[vision_feature_layer]`` and projects its last dimension, cannot hold one. This
class is ``TimmWrapperModel`` (same config fields, same weights under ``timm_model.``) whose
forward returns every block's output as tokens, (B, H*W, D), the prefix tokens (CLS, registers)
dropped: ``hidden_states[-1]`` is the last block's output, ``hidden_states[-2]`` the one before
(LLaVA-1.5's choice), and so on; the tuple holds the blocks only, so feature layers count from
the end.

``vlmalign_timm_vit`` is registered with AutoConfig / AutoModel when ``vlmalign.models`` is
imported (as a composed model's ``vision_config``); building either kind of tower needs timm.
"""

from __future__ import annotations

import functools

import torch
from transformers import TimmWrapperConfig, TimmWrapperModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import ModelError
from .generic import ImageFeatures
from .llava import LlavaAdapter
from .registry import register

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


def register_auto() -> None:
    from transformers import AutoConfig, AutoModel
    AutoConfig.register(MODEL_TYPE, TimmViTConfig, exist_ok=True)
    AutoModel.register(TimmViTConfig, TimmViTModel, exist_ok=True)


def as_timm_vit(tower, size: int, source: str):
    """A timm tower whose features are tokens as our ``vlmalign_timm_vit``, the same weights."""
    timm_model = tower.timm_model
    patch = getattr(getattr(timm_model, "patch_embed", None), "patch_size", None)
    if not hasattr(timm_model, "forward_intermediates") or patch is None or patch[0] != patch[-1]:
        raise ModelError(f"--vision {source}: timm's {tower.config.architecture} gives tokens but has no "
                         "forward_intermediates or square patch_embed.patch_size; compose reads a timm token tower's "
                         "per-block outputs through them")
    fields = {k: v for k, v in tower.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = TimmViTConfig(**fields)
    config.hidden_size, config.patch_size, config.image_size = timm_model.num_features, int(patch[0]), size
    vit = TimmViTModel(config).eval()
    vit.load_state_dict(tower.state_dict())
    return vit


def timm_feature_map(tower, size: int) -> tuple[int, int]:
    """(stride, channels) of a timm CNN tower's last feature map at ``size`` px, found by running it
    once."""
    with torch.no_grad():
        out = tower(torch.zeros(1, 3, size, size), do_pooling=False).last_hidden_state
    name = tower.config.architecture
    if size % out.shape[-1] or size // out.shape[-1] != size // out.shape[-2]:
        raise ModelError(f"timm tower {name}: a {size} px image gives a {out.shape[-2]}x{out.shape[-1]} map, not an "
                         "integer stride; pick an --image-size that is a multiple of the tower's stride")
    return size // out.shape[-1], out.shape[1]


@register
class FastVlmAdapter(LlavaAdapter):
    """transformers' FastVLM (``fast_vlm``), what compose makes of a timm tower: LLaVA's layout, the
    tower's last (B, C, H, W) feature map flattened into H*W image tokens. The tower's BatchNorm
    layers stay in eval mode when the model trains (:func:`batchnorm_stays_in_eval`)."""

    family = "fast_vlm"
    model_types = ("fast_vlm",)

    def __init__(self, model, processor):
        super().__init__(model, processor)
        batchnorm_stays_in_eval(model.model.vision_tower)

    def mm_kwargs(self, encoded, indices):
        """FastVLM's forward moves precomputed features with one ``.to`` and scatters them into the
        image tokens in order: the generic fallback's :class:`ImageFeatures`, whose ``.to``
        concatenates the images' features."""
        kwargs = super().mm_kwargs(encoded, indices)
        if kwargs:
            out = kwargs["mm_encoder_outputs"]["image"]
            out.pooler_output = ImageFeatures(out.pooler_output)
        return kwargs


def batchnorm_stays_in_eval(tower: torch.nn.Module) -> None:
    """Keep ``tower``'s BatchNorm layers in eval mode (their running statistics) whatever mode the
    model is put in. In training mode they would normalise by the batch: an image's features would
    depend on the other images encoded with it (so one encoding could not serve every row that
    shows the image), and a frozen tower would still drift through its running statistics. As our
    EfficientNet-lite's ``freeze_batchnorm`` does; a no-op for towers without BatchNorm. The tower's
    class becomes a subclass whose ``train`` does this (copies and FSDP2's wrapping keep it)."""
    if getattr(tower, "_vlmalign_batchnorm_eval", False) or not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in tower.modules()):
        return
    tower.__class__ = _batchnorm_eval_class(type(tower))
    tower.train(tower.training)


@functools.cache
def _batchnorm_eval_class(cls: type) -> type:
    def train(self, mode: bool = True):
        cls.train(self, mode)
        for m in self.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self
    return type(cls.__name__, (cls,), {"train": train, "_vlmalign_batchnorm_eval": True,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})
