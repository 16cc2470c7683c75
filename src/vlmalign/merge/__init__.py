"""Merging and averaging models: full checkpoints of one architecture tensor by tensor, LoRA adapters
as weight updates (see docs/MERGING.md). The per-tensor methods are mergekit's."""

from __future__ import annotations

from pathlib import Path

from ..models.peft import is_adapter_dir
from .full import merge_checkpoints
from .lora import merge_adapters
from .methods import METHODS, MergeError, MergeSpec
from .report import MergeReport


def merge(inputs: list[str], out: str, spec: MergeSpec, *, base: str | None = None, lora_out: str | None = None,
          trust_remote_code: bool = False) -> MergeReport:
    """Merge ``inputs`` (all model directories, or all LoRA adapter directories) into ``out``."""
    for p in inputs:
        if not Path(p).is_dir():
            raise MergeError(f"{p}: no such model or adapter directory")
    kinds = [is_adapter_dir(p) for p in inputs]
    if any(kinds) and not all(kinds):
        adapter, full = inputs[kinds.index(True)], inputs[kinds.index(False)]
        raise MergeError(f"{adapter} is a LoRA adapter and {full} is not: merge adapters with adapters and "
                         f"full checkpoints with full checkpoints (vlmalign export turns an adapter into one)")
    if all(kinds):
        return merge_adapters(inputs, out, spec, base=base, lora_out=lora_out or "merged",
                              trust_remote_code=trust_remote_code)
    if lora_out is not None:
        raise MergeError("--lora-out is for merging LoRA adapters; the inputs are full checkpoints")
    return merge_checkpoints(inputs, out, spec, base=base)


__all__ = ["METHODS", "MergeError", "MergeReport", "MergeSpec", "merge", "merge_adapters", "merge_checkpoints"]
