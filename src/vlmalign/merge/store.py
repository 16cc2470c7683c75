"""Reading the safetensors of a model directory tensor by tensor, writing merged ones in shards, and
copying the files around the weights (config, processor, tokenizer, prompt layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .methods import MergeError

INDEX = "model.safetensors.index.json"
# files that hold weights or training state: never copied from an input into a merged directory
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")
SHARD_BYTES = 5 * 2**30


class TensorFiles:
    """The tensors of a model directory's ``*.safetensors`` (sharded or not), read on demand."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open
        self.path = Path(path)
        index = self.path / INDEX
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise MergeError(f"{self.path}: no .safetensors weights (vlmalign reads safetensors only)")
        self._where: dict[str, tuple[str, object]] = {}
        for name in files:
            if not (self.path / name).exists():
                raise MergeError(f"{index}: names the shard {name}, which is not in {self.path}")
            handle = safe_open(str(self.path / name), framework="pt")
            for key in handle.keys():
                self._where[key] = (name, handle)

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self.path / self._where[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][1].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._where[key][1].get_tensor(key)


def check_same_tensors(first: TensorFiles, other: TensorFiles) -> None:
    """Refuse ``other`` where its tensor names or shapes differ from ``first``'s, by file and tensor."""
    have, want = set(other.keys()), set(first.keys())
    missing = [k for k in first.keys() if k not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MergeError(f"{other.path}: tensor {missing[0]} of {first.file_of(missing[0])} is missing{more}: "
                         "the inputs must be checkpoints of the same architecture")
    extra = [k for k in other.keys() if k not in want]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise MergeError(f"{other.file_of(extra[0])}: tensor {extra[0]} is not in {first.path}{more}: "
                         "the inputs must be checkpoints of the same architecture")
    for k in first.keys():
        a, b = first.shape(k), other.shape(k)
        if a != b:
            raise MergeError(f"{other.file_of(k)}: tensor {k} has shape {list(b)}, but {list(a)} in "
                             f"{first.file_of(k)}: the inputs must have the same sizes")


class ShardWriter:
    """Writes tensors into ``model.safetensors``, or into ``model-0000i-of-0000N.safetensors`` shards
    with an index past ``max_bytes``, as ``save_pretrained`` names them."""

    def __init__(self, out: Path, max_bytes: int = SHARD_BYTES):
        self.out, self.max_bytes = out, max_bytes
        self.shards: list[list[str]] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._size = self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self._pending and self._size + n > self.max_bytes:
            self._flush()
        self._pending[key] = tensor.detach().contiguous().cpu()
        self._size += n
        self.total += n

    def _flush(self) -> None:
        from safetensors.torch import save_file
        save_file(self._pending, str(self.out / f".shard-{len(self.shards)}"), metadata={"format": "pt"})
        self.shards.append(list(self._pending))
        self._pending, self._size = {}, 0

    def close(self) -> None:
        if self._pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.out / ".shard-0").rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f".shard-{i}").rename(self.out / name)
            weight_map.update({k: name for k in keys})
        (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                  "weight_map": weight_map}, indent=2))


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the files of ``src`` that are not weights (config, processor, tokenizer, chat template,
    prompt layout) into ``dst``."""
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in skip:
            shutil.copy2(p, dst / p.name)
