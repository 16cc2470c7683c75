"""Load a local directory (or hub id) into model + processor, securely by default."""

from __future__ import annotations

import os

import torch

from ..errors import ModelError


def read_config(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"cannot read a model config at {path!r}: {e}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ModelError(f"{path!r} needs custom code; pass trust_remote_code=True only if you trust it") from None
        raise ModelError(f"cannot read a model config at {path!r}: {e}") from None


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    try:
        return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r} (use fp32, bf16 or fp16)") from None


def load_processor(path: str, *, trust_remote_code: bool = False, config=None):
    """AutoProcessor, with family fallbacks where transformers needs optional packages."""
    from . import registry
    config = config or read_config(path, trust_remote_code=trust_remote_code)
    adapter_cls = registry.adapter_class(config.model_type)
    return adapter_cls.load_processor(path, trust_remote_code=trust_remote_code)


def load_model_and_processor(path: str, *, trust_remote_code: bool = False, dtype=None, **kwargs):
    """Weights-only, safetensors-first loading; remote code only when asked for."""
    from transformers import AutoModelForImageTextToText
    config = read_config(path, trust_remote_code=trust_remote_code)
    if os.path.isdir(path) and not any(f.endswith(".safetensors") for f in os.listdir(path)) \
            and not kwargs.get("allow_pickle", False):
        raise ModelError(f"{path!r} has no .safetensors weights; vlmalign loads safetensors only "
                         "(convert the checkpoint first)")
    kwargs.pop("allow_pickle", None)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, config=config, trust_remote_code=trust_remote_code, dtype=_dtype(dtype),
            use_safetensors=True, **kwargs)
    except ValueError as e:
        raise ModelError(f"cannot load {path!r} as an image-text-to-text model: {e}") from None
    processor = load_processor(path, trust_remote_code=trust_remote_code, config=config)
    return model, processor
