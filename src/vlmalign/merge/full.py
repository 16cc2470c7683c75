"""Merging full checkpoints of one architecture, tensor by tensor, into a normal model directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import atomic_dir
from .methods import TASK_METHODS, MergeError, MergeSpec, merge_one, resolve
from .report import MergeReport
from .store import ShardWriter, TensorFiles, check_same_tensors, copy_side_files


def merge_checkpoints(inputs: list[str], out: str, spec: MergeSpec, *, base: str | None = None,
                      shard_bytes: int | None = None) -> MergeReport:
    """Merge the model directories ``inputs`` into ``out`` (written atomically); ``base``: the checkpoint
    task methods take the differences from. Config and processor files come from the first input."""
    spec = resolve(spec, len(inputs))
    if spec.method in TASK_METHODS and base is None:
        raise MergeError(f"--method {spec.method} merges differences from a base: pass --base, the checkpoint "
                         "the inputs were fine-tuned from")
    if base is not None and spec.method not in TASK_METHODS:
        raise MergeError(f"--base is the checkpoint {', '.join(TASK_METHODS)} take differences from; "
                         f"--method {spec.method} uses none")
    check_configs(inputs + ([base] if base else []))
    files = [TensorFiles(p) for p in inputs]
    base_files = TensorFiles(base) if base else None
    for f in files[1:] + ([base_files] if base_files else []):
        check_same_tensors(files[0], f)
    report = MergeReport(out=str(out), kind="full", spec=spec, inputs=[str(p) for p in inputs], base=base)
    with torch.random.fork_rng(devices=[]), atomic_dir(out) as tmp:
        torch.manual_seed(spec.seed)   # dare's random drops
        copy_side_files(Path(inputs[0]), tmp)
        writer = ShardWriter(tmp, **({"max_bytes": shard_bytes} if shard_bytes else {}))
        for key in files[0].keys():
            tensors = [f.get(key) for f in files]
            where = [f.file_of(key) for f in files] + ([base_files.file_of(key)] if base_files else [])
            writer.add(key, merge_one(spec, key, tensors, base_files.get(key) if base_files else None, where))
            report.tensors += 1
        writer.close()
        report.write(tmp)
    return report


def check_configs(paths: list[str]) -> None:
    """Refuse inputs whose config.json names another architecture than the first's, by file."""
    first = None
    for p in paths:
        f = Path(p) / "config.json"
        if not f.exists():
            raise MergeError(f"{p}: not a model directory (no config.json)")
        cfg = json.loads(f.read_text())
        arch = {"model_type": cfg.get("model_type"), "architectures": cfg.get("architectures")}
        if first is None:
            first = (f, arch)
            continue
        for k, v in arch.items():
            if v != first[1][k]:
                raise MergeError(f"{f}: {k} {v!r} differs from {first[0]}'s {first[1][k]!r}: only checkpoints "
                                 "of the same architecture can be merged")
