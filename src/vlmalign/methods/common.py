"""Pieces every method shares: model construction, freezing, LoRA, data loading."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..data.batching import ImageLoader, SkipReport, prepare
from ..errors import ModelError, VlmalignError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_dtype(name: str):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_adapter(model_cfg, *, seed: int = 0):
    """Load ``model.path`` (or build ``model.tiny``) and wrap it in its family adapter."""
    from ..models import adapter_for, build_tiny, load_adapter
    if bool(model_cfg.path) == bool(model_cfg.tiny):
        raise VlmalignError("set exactly one of model.path and model.tiny")
    if model_cfg.tiny:
        model, processor = build_tiny(model_cfg.tiny, seed=seed)
        ad = adapter_for(model, processor)
    else:
        ad = load_adapter(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code,
                          dtype=resolve_dtype(model_cfg.dtype))
    return ad


def configure_trainable(adapter, model_cfg, lora_cfg):
    """Freeze groups per config; wrap with LoRA if enabled. Returns the module to train."""
    adapter.set_trainable(vision=model_cfg.train_vision, projector=model_cfg.train_projector,
                          language=model_cfg.train_language and not lora_cfg.enabled)
    if model_cfg.gradient_checkpointing:
        adapter.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        adapter.model.config.use_cache = False
    if not lora_cfg.enabled:
        return adapter.model
    if lora_cfg.qlora and not torch.cuda.is_available():
        raise ModelError("QLoRA needs a CUDA GPU and bitsandbytes (4-bit weights); this machine has no "
                         "CUDA device. Use lora.enabled=true without lora.qlora.")
    from peft import LoraConfig, get_peft_model
    targets = lora_cfg.targets or adapter.lora_target_modules(include_vision=lora_cfg.include_vision)
    # groups trained in full next to the adapters (projector, maybe the tower) are saved with the
    # adapter (PEFT modules_to_save), so an adapter checkpoint is complete and exports cleanly
    full = [g for g, on in (("projector", model_cfg.train_projector),
                            ("vision", model_cfg.train_vision and not lora_cfg.include_vision)) if on]
    owners = {_module_of(n, adapter, g) for g in full for n, _ in adapter.param_groups()[g]}
    modules = {o for o in owners if isinstance(_get(adapter.model, o), torch.nn.Module)}
    bare = {n for g in full for n, _ in adapter.param_groups()[g] if _module_of(n, adapter, g) not in modules}
    pcfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=targets, modules_to_save=sorted(modules) or None, bias="none")
    peft_model = get_peft_model(adapter.model, pcfg)
    # parameters that are not modules (e.g. LLaVA-Next's image_newline) cannot be modules_to_save:
    # keep them trainable; checkpoints store them in extra_params.safetensors beside the adapter
    for n, p in peft_model.base_model.model.named_parameters():
        if n in bare:
            p.requires_grad_(True)
    return peft_model


def _get(model, dotted: str):
    obj = model
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _module_of(param_name: str, adapter, group: str) -> str:
    """The top module of ``group`` that owns ``param_name`` (e.g. model.multi_modal_projector)."""
    prefixes = {"projector": adapter.projector_prefixes, "vision": adapter.vision_prefixes}[group]
    for p in prefixes:
        if param_name.startswith(p):
            return p.rstrip(".")
    return param_name.rsplit(".", 1)[0]


def data_root(data_cfg, file: str) -> str:
    return data_cfg.image_root or os.path.dirname(os.path.abspath(file))


def read_records(path: str, data_cfg, *, kind: str | None = None, limit: int | None = None):
    """Read a data file into schema records, honouring the skip policy for unreadable records."""
    from ..data.readers import iter_records
    recs, report = [], SkipReport()
    for item in iter_records(path, format=data_cfg.format, kind=kind):
        idx, rec = item if isinstance(item, tuple) else (None, item)
        report.total += 1
        if isinstance(rec, Exception):
            if data_cfg.on_error == "raise":
                raise rec
            report.skipped.append(rec)
            continue
        recs.append(rec)
        if limit is not None and len(recs) >= limit:
            break
    return recs, report


def load_examples(path: str, data_cfg, adapter, tokenize, *, kind=None, limit=None):
    """Records -> tokenized examples (+ the image loader and what was skipped)."""
    recs, rep1 = read_records(path, data_cfg, kind=kind, limit=limit)
    loader = ImageLoader(adapter, data_root(data_cfg, path))
    examples, rep2 = prepare(recs, tokenize, loader, on_error=data_cfg.on_error)
    rep = SkipReport(skipped=rep1.skipped + rep2.skipped, total=rep1.total)
    if rep.count:
        print(f"{path}: {rep.summary()}")
    return examples, loader, rep


def write_json(path: str | Path, obj) -> None:
    import json
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))
    os.replace(tmp, p)
