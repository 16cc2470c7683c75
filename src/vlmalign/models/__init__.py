"""The model layer: the only place where family quirks live.

    adapter = load_adapter("path/to/model")            # any supported family
    model, processor = build_tiny("llava")            # offline random-init tiny model
"""

from __future__ import annotations

# Encoding each image once hands the features to transformers' forward and generate as
# ``mm_encoder_outputs``, which transformers accepts from 5.18 on (5.17's generate refuses it).
MIN_TRANSFORMERS = "5.18"


def _check_transformers() -> None:
    import transformers
    from packaging.version import Version

    from ..errors import ModelError
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ModelError(f"vlmalign needs transformers>={MIN_TRANSFORMERS} (found {transformers.__version__}): "
                         f"it passes precomputed image features as mm_encoder_outputs; "
                         f"pip install 'transformers>={MIN_TRANSFORMERS},<6'")


_check_transformers()


def _register_auto_classes() -> None:
    """Our own model classes (the EfficientNet-lite and timm ViT towers, the resampler VLM) with
    transformers' Auto classes, so ``from_pretrained`` loads a composed directory offline, without remote code
    (models/compose.py, docs/MODELS.md "Composing a model")."""
    from . import aligngpt, efficientnet_lite, resampler, timm_towers
    efficientnet_lite.register()
    timm_towers.register_auto()
    resampler.register()
    aligngpt.register_auto()


_register_auto_classes()

from .adapter import (IGNORE_INDEX, EncodedImages, ImageInputs, Tokenized, TokenizedPair, VLMAdapter,
                      to_hf_messages)
from .registry import adapter_class, families
from .scalar_head import ScalarModel, load_scalar_model


def adapter_for(model, processor) -> VLMAdapter:
    """Wrap an already-loaded model + processor in its family's adapter."""
    return adapter_class(model.config.model_type)(model, processor)


def load_adapter(path: str, *, trust_remote_code: bool = False, dtype=None, device=None, **kwargs) -> VLMAdapter:
    """Load a local directory or hub id; ``trust_remote_code`` stays off unless asked for."""
    from .loading import load_model_and_processor
    model, processor = load_model_and_processor(path, trust_remote_code=trust_remote_code, dtype=dtype, **kwargs)
    if device is not None:
        model.to(device)
    return adapter_for(model, processor)


def build_tiny(family: str, **kwargs):
    """(model, processor) of a random-init tiny model of ``family``, built offline."""
    from ..errors import ModelError
    from .registry import tiny_builders
    builders = tiny_builders()
    if family not in builders:
        raise ModelError(f"no tiny builder for {family!r}; known: {', '.join(sorted(builders))}")
    return builders[family](**kwargs)


def save_tiny(family: str, out_dir: str, **kwargs) -> str:
    """Build a tiny model and save it as a normal Hugging Face directory (safetensors)."""
    model, processor = build_tiny(family, **kwargs)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


__all__ = ["IGNORE_INDEX", "EncodedImages", "ImageInputs", "Tokenized", "TokenizedPair", "VLMAdapter",
           "adapter_for", "adapter_class", "build_tiny", "families", "load_adapter", "save_tiny", "to_hf_messages",
           "ScalarModel", "load_scalar_model"]
