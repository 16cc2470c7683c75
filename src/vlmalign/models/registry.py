"""config.model_type -> adapter class. Families register themselves on import."""

from __future__ import annotations

_ADAPTERS: dict[str, type] = {}
_TINY_BUILDERS: dict[str, callable] = {}
_FAMILY_MODULES = ("llava", "llava_next", "qwen2_vl", "idefics3", "paligemma", "instructblip", "gemma3", "qwen3_vl", "internvl", "mllama", "compose", "aligngpt")
_loaded = False


def register(cls):
    for mt in cls.model_types:
        _ADAPTERS[mt] = cls
    return cls


def register_tiny(family: str):
    def deco(fn):
        _TINY_BUILDERS[family] = fn
        return fn
    return deco


def _load_families():
    global _loaded
    if _loaded:
        return
    import importlib
    for name in _FAMILY_MODULES:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:  # a family module not written yet
            if e.name != f"{__package__}.{name}":
                raise
    _loaded = True


def adapter_class(model_type: str):
    _load_families()
    from .generic import GenericAdapter
    return _ADAPTERS.get(model_type, GenericAdapter)


def tiny_builders() -> dict:
    _load_families()
    return dict(_TINY_BUILDERS)


def families() -> list[str]:
    return sorted(tiny_builders())
