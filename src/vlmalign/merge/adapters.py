"""Reading LoRA adapter directories as weight updates, and checking that several can be merged.

An adapter's update of a Linear layer is ``ΔW = s · B @ A`` (``A``: r x in, ``B``: out x r, ``s`` =
lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; per-module ranks and alphas from the config's
rank_pattern / alpha_pattern, matched as PEFT matches them). Tensors the adapter holds in full
(PEFT ``modules_to_save``, vlmalign's extra_params.safetensors) are kept by their name in the base model.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.peft import EXTRA_PARAMS
from .methods import MergeError

PREFIX = "base_model.model."
A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"
WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraAdapter:
    path: Path
    config: dict
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)
    full: dict[str, torch.Tensor] = field(default_factory=dict)    # modules_to_save, by base-model name
    extra: dict[str, torch.Tensor] = field(default_factory=dict)   # extra_params.safetensors

    @property
    def file(self) -> Path:
        return self.path / WEIGHTS

    def scaling(self, module: str) -> float:
        """``s`` of ``module``'s update, as PEFT computes it from the config."""
        from peft.utils.other import get_pattern_key
        c = self.config
        rank_pattern, alpha_pattern = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), c["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), c["lora_alpha"])
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r

    def delta(self, module: str) -> torch.Tensor:
        """``ΔW = s · B @ A`` of ``module`` in float32 (out x in, the Linear weight's shape)."""
        a, b = self.lora[module]
        return self.scaling(module) * (b.float() @ a.float())

    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.lora.values())


def read_adapter(path: str | os.PathLike) -> LoraAdapter:
    """The adapter directory ``path``, or an error naming the file and key it cannot merge."""
    from safetensors.torch import load_file
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        raise MergeError(f"{path}: not a LoRA adapter directory (no adapter_config.json)")
    cfg = json.loads(cfg_file.read_text())
    _check_config(cfg_file, cfg)
    ad = LoraAdapter(path, cfg)
    if not ad.file.exists():
        raise MergeError(f"{path}: no {WEIGHTS} (vlmalign reads safetensors only)")
    tensors = load_file(str(ad.file))
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise MergeError(f"{ad.file}: tensor {key} is not a PEFT adapter key (no {PREFIX!r} prefix)")
        name = key[len(PREFIX):]
        if name.endswith(A_KEY):
            module = name[:-len(A_KEY)]
            b = tensors.get(PREFIX + module + B_KEY)
            if b is None:
                raise MergeError(f"{ad.file}: tensor {key} has no {PREFIX + module + B_KEY} beside it")
            if t.ndim != 2 or b.ndim != 2 or b.shape[1] != t.shape[0]:
                raise MergeError(f"{ad.file}: {module}: lora_A {list(t.shape)} and lora_B {list(b.shape)} are "
                                 "not the factors of a Linear layer's update (vlmalign merges Linear LoRA only)")
            ad.lora[module] = (t, b)
        elif name.endswith(B_KEY):
            if PREFIX + name[:-len(B_KEY)] + A_KEY not in tensors:
                raise MergeError(f"{ad.file}: tensor {key} has no {PREFIX + name[:-len(B_KEY)] + A_KEY} beside it")
        elif any(part.startswith("lora_") for part in name.split(".")):   # embedding, conv, DoRA ...
            raise MergeError(f"{ad.file}: tensor {key}: vlmalign merges LoRA on Linear layers (lora_A / lora_B) "
                             "only; merge this adapter into its base first (vlmalign export)")
        else:
            ad.full[name] = t
    if (path / EXTRA_PARAMS).exists():
        ad.extra = load_file(str(path / EXTRA_PARAMS))
    if not ad.lora:
        raise MergeError(f"{ad.file}: holds no LoRA update (no {A_KEY} tensors)")
    return ad


def _check_config(f: Path, cfg: dict) -> None:
    if cfg.get("peft_type") != "LORA":
        raise MergeError(f"{f}: peft_type {cfg.get('peft_type')!r}: only LoRA adapters can be merged")
    for key, why in (("use_dora", "DoRA's magnitude vectors"), ("lora_bias", "LoRA biases"),
                     ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")):
        if cfg.get(key):
            raise MergeError(f"{f}: {key} is set: merging {why} is not supported; merge each adapter into "
                             "its base (vlmalign export) and merge the full checkpoints")
    if cfg.get("bias", "none") != "none":
        raise MergeError(f"{f}: bias {cfg['bias']!r}: adapters that train biases are not supported; merge each "
                         "into its base (vlmalign export) and merge the full checkpoints")


def check_adapters(adapters: list[LoraAdapter], base: str | None = None) -> list[str]:
    """Refuse adapters that are not updates of the same base model's same modules, naming the file.
    Two base names are the same model when they are equal or name local directories with the same
    config and weight files. Names that cannot be compared here (a hub id, a directory no longer
    there) are accepted only with ``base`` given; the notes returned say so."""
    first, notes = adapters[0], []
    for ad in adapters[1:]:
        a, b = first.config.get("base_model_name_or_path"), ad.config.get("base_model_name_or_path")
        same = True if not (a and b) else _same_model(a, b)
        if same is None and base:
            notes.append(f"{ad.path} names the base {b!r}, {first.path} {a!r}: merged onto --base {base} as asked")
        elif not same:
            why = "" if same is False else " (they cannot be compared here: pass --base if they are the same model)"
            raise MergeError(f"{ad.path / 'adapter_config.json'}: base model {b!r} differs from "
                             f"{first.path}'s {a!r}{why}: adapters of different base models cannot be merged")
        _same_names(first, ad, set(first.lora), set(ad.lora), "LoRA target modules", "module")
        _same_names(first, ad, set(first.full), set(ad.full), "fully trained tensors (modules_to_save)", "tensor")
        _same_names(first, ad, set(first.extra), set(ad.extra), f"tensors in {EXTRA_PARAMS}", "tensor")
        for m in first.lora:
            s0 = (first.lora[m][1].shape[0], first.lora[m][0].shape[1])
            s1 = (ad.lora[m][1].shape[0], ad.lora[m][0].shape[1])
            if s0 != s1:
                raise MergeError(f"{ad.file}: {m}: update of shape {list(s1)}, but {list(s0)} in {first.file}")
        for name, (t0, t1) in {**{n: (first.full[n], ad.full[n]) for n in first.full},
                               **{n: (first.extra[n], ad.extra[n]) for n in first.extra}}.items():
            if t0.shape != t1.shape:
                raise MergeError(f"{ad.path}: tensor {name} has shape {list(t1.shape)}, but {list(t0.shape)} "
                                 f"in {first.path}")
    return notes


def _same_names(first: LoraAdapter, ad: LoraAdapter, a: set, b: set, what: str, one: str) -> None:
    if a != b:
        missing, extra = sorted(a - b), sorted(b - a)
        diff = f"{one} {missing[0]} is missing" if missing else f"{one} {extra[0]} is not in {first.path}"
        raise MergeError(f"{ad.file}: its {what} differ from {first.file}'s ({diff}; "
                         f"{len(missing)} missing, {len(extra)} extra): adapters must adapt the same modules")


def _same_model(a: str, b: str) -> bool | None:
    """Whether the base names ``a`` and ``b`` are one model; None where that cannot be told here."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.is_dir() and pb.is_dir()):
        return None
    if os.path.samefile(pa, pb):
        return True
    names = {p.name for p in pa.iterdir() if p.name == "config.json" or p.name.endswith(".safetensors")}
    if names != {p.name for p in pb.iterdir() if p.name == "config.json" or p.name.endswith(".safetensors")}:
        return False
    return all(filecmp.cmp(pa / n, pb / n, shallow=False) for n in sorted(names))
