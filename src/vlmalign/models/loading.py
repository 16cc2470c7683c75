"""Load a local directory (or hub id) into model + processor, securely by default."""

from __future__ import annotations

import os

import torch

from ..errors import ModelError


def looks_local(path: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, ./ ../ ~, or more than one separator."""
    p = str(path)
    return os.path.isabs(p) or p.startswith((".", "~")) or p.count("/") > 1 or os.sep != "/" and os.sep in p


def check_model_dir(path: str) -> None:
    """Refuse a local model path that does not exist, is a file, or has no config.json, by name
    (transformers would answer "Repo id must be in the form ...")."""
    p = os.path.expanduser(str(path))
    if os.path.isdir(p):
        if not os.path.exists(os.path.join(p, "config.json")) and \
                not os.path.exists(os.path.join(p, "adapter_config.json")):
            raise ModelError(f"{path}: not a model directory (no config.json or adapter_config.json in it)")
        return
    if os.path.exists(p):
        raise ModelError(f"{path}: is a file, not a model directory")
    if looks_local(path):
        raise ModelError(f"model directory not found: {path}")


def read_config(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoConfig
    check_model_dir(path)
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(str(path)), trust_remote_code=trust_remote_code)
    except OSError as e:
        local = "" if os.path.isdir(os.path.expanduser(str(path))) else \
            f" (no local directory {path!r} exists either)"
        raise ModelError(f"cannot read a model config at {path!r}{local}: {e}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ModelError(f"{path!r} needs custom code (config.json auto_map); it was not run. Pass "
                             "trust_remote_code=True (CLI --trust-remote-code, config model.trust_remote_code=true) "
                             "only if you trust it") from None
        raise ModelError(f"cannot read a model config at {path!r}: {e}") from None


# the one table of dtype names (config ``model.dtype``, CLI ``--dtype``) -> torch dtypes
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _named_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r} (use fp32, bf16 or fp16)") from None


def resolve_dtype(name: str) -> torch.dtype:
    """A config dtype name as a torch dtype; ``"auto"``: bf16 on a CUDA device that supports
    it, else fp16 there, fp32 without CUDA."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return _named_dtype(name)


def _dtype(dtype):
    """``from_pretrained``'s dtype: None, a torch dtype and ``"auto"`` (the checkpoint's) as
    they are, names through ``DTYPES``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    return _named_dtype(dtype)


def load_processor(path: str, *, trust_remote_code: bool = False, config=None):
    """AutoProcessor, with family fallbacks where transformers needs optional packages."""
    from . import registry
    config = config or read_config(path, trust_remote_code=trust_remote_code)
    adapter_cls = registry.adapter_class(config.model_type)
    return adapter_cls.load_processor(path, trust_remote_code=trust_remote_code)


def load_model_and_processor(path: str, *, trust_remote_code: bool = False, dtype=None, config=None,
                             **kwargs):
    """Weights-only, safetensors-first loading; remote code only when asked for. ``config``:
    the model's config where the caller has read it already (else it is read here)."""
    from transformers import AutoModelForImageTextToText
    config = config or read_config(path, trust_remote_code=trust_remote_code)
    allow_pickle = kwargs.pop("allow_pickle", False)
    if os.path.isdir(path) and not any(f.endswith(".safetensors") for f in os.listdir(path)) \
            and not allow_pickle:
        raise ModelError(f"{path!r} has no .safetensors weights; vlmalign loads safetensors only "
                         "(convert the checkpoint first, or pass allow_pickle=True to read .bin weights "
                         "with torch.load(weights_only=True))")
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, config=config, trust_remote_code=trust_remote_code, dtype=_dtype(dtype),
            # allow_pickle: safetensors when present, else .bin through transformers' weights-only load
            use_safetensors=None if allow_pickle else True, **kwargs)
    except ValueError as e:
        raise ModelError(f"cannot load {path!r} as an image-text-to-text model: {e}") from None
    processor = load_processor(path, trust_remote_code=trust_remote_code, config=config)
    return model, processor
