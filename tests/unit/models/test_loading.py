"""Model loading: the one dtype table, and QLoRA reading a model's config.json once."""

from __future__ import annotations

import types

import pytest
import torch

from vlmalign.errors import ModelError
from vlmalign.methods import setup as method_setup
from vlmalign.models import loading, save_tiny


def test_config_dtype_names_resolve_through_the_one_table(monkeypatch):
    for name, want in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                       ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        assert loading.resolve_dtype(name) is want
        assert method_setup.resolve_dtype(name) is want                 # the methods' name for it
        assert loading._dtype(name) is want                       # from_pretrained's
    assert loading._dtype("auto") == "auto" and loading._dtype(None) is None  # the checkpoint's
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        loading.resolve_dtype("fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert method_setup.resolve_dtype("auto") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert method_setup.resolve_dtype("auto") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert method_setup.resolve_dtype("auto") is torch.bfloat16


def _count_reads(monkeypatch):
    reads = []
    real = loading.read_config

    def counted(path, **kw):
        reads.append(path)
        return real(path, **kw)

    monkeypatch.setattr(loading, "read_config", counted)
    return reads


def test_qlora_build_reads_the_config_once_and_loads_with_it(tmp_path, monkeypatch):
    """build_adapter with lora.qlora reads config.json for the family's module names and hands
    it to the loader, which then reads none (bitsandbytes itself is not needed: from_pretrained
    is given the quantization config, and this test loads without it)."""
    from transformers import AutoModelForImageTextToText

    path = save_tiny("llava", str(tmp_path / "m"))
    reads = _count_reads(monkeypatch)
    monkeypatch.setattr(method_setup, "check_qlora", lambda *a: None)   # no CUDA / bitsandbytes needed here
    real = AutoModelForImageTextToText.from_pretrained
    seen = {}

    def from_pretrained(p, *, config, quantization_config, **kw):
        seen.update(config=config, quantization_config=quantization_config)
        return real(p, config=config, **kw)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    model_cfg = types.SimpleNamespace(path=path, tiny=None, dtype="fp32", trust_remote_code=False)
    adapter = method_setup.build_adapter(model_cfg, lora_cfg=types.SimpleNamespace(qlora=True, enabled=True))
    assert reads == [path]
    assert adapter.family == "llava" and seen["config"].model_type == "llava"
    skip = seen["quantization_config"].llm_int8_skip_modules
    assert {"vision_tower", "multi_modal_projector", "lm_head"} <= set(skip)
