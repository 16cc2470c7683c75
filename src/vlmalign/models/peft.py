"""LoRA adapters: loading an adapter directory over its base, and merging for export."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from ..errors import ModelError, VlmalignError
from .zero import gathered

# the trained parameters of a PEFT model that its adapter file does not hold, saved beside it
EXTRA_PARAMS = "extra_params.safetensors"


def is_peft(model) -> bool:
    """Whether ``model`` is a PEFT (LoRA) wrapper."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def forward_root(model):
    """The module whose own forward every forward and ``generate`` of ``model`` runs: the
    transformers model inside a PEFT wrapper (``PeftModel.forward`` calls it, and
    ``PeftModel.generate`` calls its ``generate``, whose steps call it; the wrapper holds no
    parameters of its own), else ``model``. FSDP2 shards it as the root unit
    (engine/sharding.py): its parameters are gathered only when its own forward runs."""
    return model.get_base_model() if is_peft(model) else model


@contextlib.contextmanager
def own_base_class(model):
    """A context for saving a PEFT model whose base model is sharded with FSDP2: PEFT records
    the base model's class in adapter_config.json (``auto_mapping``, read by AutoPeftModel),
    and FSDP2 replaced that class with a subclass of its own (``FSDPLlavaForConditionalGeneration``
    of ``torch.distributed.fsdp``); inside, PEFT sees the model's own class. Nothing changes
    for any other model (transformers drops the prefix from a sharded model's config itself)."""
    if not is_peft(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    cls = type(model.get_base_model())
    if not issubclass(cls, FSDPModule):
        yield
        return
    own = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    model._get_base_model_class = lambda is_prompt_tuning=False: own   # shadows PEFT's method
    try:
        yield
    finally:
        del model._get_base_model_class


def peft_extra_params(model, state_dict: dict | None = None) -> dict:
    """Trainable parameters of a PEFT model that its adapter file does not hold (bare
    parameters such as LLaVA-Next's image_newline), by their name in the base model; their
    values from ``state_dict`` (the PEFT model's full state dict, e.g. gathered from shards)
    when given."""
    out = {}
    for n, p in model.base_model.model.named_parameters():
        if p.requires_grad and "lora_" not in n and "modules_to_save" not in n and "original_module" not in n:
            out[n] = p if state_dict is None else state_dict["base_model.model." + n]
    return out


def load_peft_extra(model, model_dir: Path) -> None:
    """Restore the parameters :func:`peft_extra_params` saved in ``model_dir`` (if any)."""
    f = Path(model_dir) / EXTRA_PARAMS
    if not f.exists():
        return
    from safetensors.torch import load_file
    params = dict(model.base_model.model.named_parameters())
    values = load_file(str(f))
    unknown = [k for k in values if k not in params]
    if unknown:
        raise VlmalignError(f"{f}: parameter {unknown[0]} is not in the model")
    # ZeRO-3 shards: written whole on process 0 (every process loads the same file) and partitioned again
    with gathered([params[k] for k in values], modifier_rank=0), torch.no_grad():
        for k, v in values.items():
            params[k].copy_(v)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def adapter_base(path: str | os.PathLike, base: str | None = None) -> str:
    """The base model an adapter directory was trained on (``base`` overrides it)."""
    if base:
        return base
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    b = cfg.get("base_model_name_or_path")
    if not b:
        raise ModelError(f"{path}: adapter_config.json names no base model; pass --base DIR")
    return b


def load_with_adapter(path: str, *, base: str | None = None, trust_remote_code: bool = False, dtype=None):
    """(PeftModel, processor) for an adapter directory; extra trained parameters restored."""
    from peft import PeftModel

    from .loading import load_model_and_processor, load_processor
    base_path = adapter_base(path, base)
    model, processor = load_model_and_processor(base_path, trust_remote_code=trust_remote_code, dtype=dtype)
    peft_model = PeftModel.from_pretrained(model, path)
    load_peft_extra(peft_model, Path(path))
    try:  # the adapter directory normally carries the processor too (it may have new tokens)
        processor = load_processor(path, trust_remote_code=trust_remote_code)
    except Exception:
        pass
    return peft_model, processor


def load_any(path: str, *, base: str | None = None, trust_remote_code: bool = False, dtype=None):
    """An adapter for a model directory or a LoRA adapter directory (merged in memory)."""
    from . import adapter_for, load_adapter
    if is_adapter_dir(path):
        peft_model, processor = load_with_adapter(path, base=base, trust_remote_code=trust_remote_code,
                                                  dtype=dtype)
        return adapter_for(peft_model.merge_and_unload(), processor)
    return load_adapter(path, trust_remote_code=trust_remote_code, dtype=dtype)


def export_merged(path: str, out: str, *, base: str | None = None, trust_remote_code: bool = False) -> str:
    """Merge a LoRA adapter into its base and save a standalone Hugging Face directory."""
    if not is_adapter_dir(path):
        raise ModelError(f"{path} is not a LoRA adapter directory (no adapter_config.json)")
    peft_model, processor = load_with_adapter(path, base=base, trust_remote_code=trust_remote_code)
    merged = peft_model.merge_and_unload()
    merged.config._name_or_path = str(out)
    merged.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    from .prompt_layout import read_layout, write_layout
    write_layout(out, read_layout(path))  # the merged model keeps the adapter's prompt layout
    return out
