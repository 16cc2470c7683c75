"""Reference log-probs computed once, cached on disk, reused across epochs and runs.

A frozen reference model gives the same log-probs for a pair at every step, so with
``dpo.precompute_ref_logps`` one pass over the data computes them (images included) and the
reference model is not run during training. The values live in
``<ref_cache_dir>/<key>/ref_logps.safetensors`` (one (N,) float32 tensor per quantity, e.g.
``chosen``, ``rejected``) with ``meta.json`` beside them. ``key`` is a hash of everything the
numbers depend on:

* the data: the file's bytes, its format, image root, sample limit and skip policy, and for
  every image file its path, size and modification time (not its bytes);
* tokenization: max_length, the chat template, and a hash of every tokenized row;
* the image processor's settings;
* the reference weights (a checksum of every tensor), their dtype and the run's precision;
* the quantities the loss needs and the settings they depend on (token weights, mDPO's
  corruption).

Change any part and the key changes, so a stale cache is never read; the same key in another
run (any output directory) loads the stored values instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
# passes computed / caches loaded in this process (tests count them)
COUNTERS = {"computed": 0, "loaded": 0}


def default_cache_dir() -> str:
    base = os.environ.get("VLMALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlmalign")
    return os.path.join(base, "ref_logps")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_sha256(obj) -> str:
    return _sha(json.dumps(obj, sort_keys=True, default=str).encode())


@torch.no_grad()
def module_fingerprint(named_tensors) -> str:
    """A checksum of (name, shape, dtype, sum, position-weighted sum) per tensor, computed where
    the tensors are (no copy of the weights to the host); any realistic change of a weight moves
    it. ``named_tensors``: iterable of (name, tensor)."""
    h = hashlib.sha256()
    chunk = 1 << 24
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        flat = t.detach().reshape(-1)
        s1 = s2 = 0.0
        for i in range(0, flat.numel(), chunk):
            part = flat[i:i + chunk].double()
            w = (torch.arange(i, i + part.numel(), device=part.device, dtype=torch.float64) % 1021) + 1
            s1 += float(part.sum())
            s2 += float((part * w).sum())
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{s1:.17g}|{s2:.17g}\n".encode())
    return h.hexdigest()


def images_fingerprint(examples, image_root) -> str:
    """Path, size and mtime of every image file the examples use (inline images: their bytes)."""
    from ..data.images import resolve_image_path
    seen, rows = set(), []
    for ex in examples:
        refs = list(ex.images) + list(getattr(ex.record, "rejected_images", None) or [])
        for ref in refs:
            k = ref.key()
            if k in seen:
                continue
            seen.add(k)
            if ref.path is None:
                rows.append((k, None, None))
                continue
            p = resolve_image_path(ref.path, image_root)
            st = os.stat(p)
            rows.append((ref.path, st.st_size, st.st_mtime_ns))
    return json_sha256(rows)


def rows_fingerprint(examples) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps({k: v for k, v in ex.rows.items() if not k.startswith("_")},
                            sort_keys=True).encode())
    return h.hexdigest()


def key_parts(*, data_file, data_cfg, image_root, examples, adapter, reference: dict, loss: dict) -> dict:
    """Everything the cached numbers depend on (see the module docstring), as plain JSON."""
    processor = adapter.processor
    template = getattr(processor, "chat_template", None) or getattr(adapter.tokenizer, "chat_template", None)
    image_processor = getattr(processor, "image_processor", None)
    return {
        "version": FORMAT_VERSION,
        "data": {"sha256": file_sha256(data_file), "format": data_cfg.format, "image_root": str(image_root),
                 "images": images_fingerprint(examples, image_root), "num_examples": len(examples),
                 "on_error": data_cfg.on_error},
        "tokens": {"max_length": data_cfg.max_length, "chat_template": json_sha256(template),
                   "rows": rows_fingerprint(examples)},
        "image_processor": json_sha256(image_processor.to_dict() if image_processor is not None else None),
        "reference": {"family": adapter.family, **reference},
        "loss": loss,
    }


class RefLogpsCache:
    """One cache entry: ``root/<key>/`` with ``ref_logps.safetensors`` and ``meta.json``."""

    def __init__(self, root: str | os.PathLike, parts: dict):
        self.parts = parts
        self.key = json_sha256(parts)[:24]
        self.dir = Path(root) / self.key

    def load(self, n: int) -> dict[str, torch.Tensor] | None:
        f = self.dir / "ref_logps.safetensors"
        if not f.exists():
            return None
        from safetensors.torch import load_file
        meta = json.loads((self.dir / "meta.json").read_text())
        values = load_file(str(f))
        if meta.get("num_examples") != n or any(v.shape != (n,) for v in values.values()):
            raise RuntimeError(f"{self.dir}: cached reference log-probs are for {meta.get('num_examples')} "
                               f"examples, this data has {n}; delete the directory")
        return values

    def save(self, values: dict[str, torch.Tensor], n: int) -> None:
        from safetensors.torch import save_file
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.dir.parent / f".tmp-{self.key}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file({k: v.detach().float().cpu().contiguous() for k, v in values.items()},
                  str(tmp / "ref_logps.safetensors"))
        meta = {"format_version": FORMAT_VERSION, "key": self.key, "num_examples": n,
                "quantities": sorted(values), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "parts": self.parts}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        try:
            os.replace(tmp, self.dir)
        except OSError:  # another process stored the same key first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)


def load_or_compute(cache: RefLogpsCache, n: int, compute: Callable[[], dict[str, torch.Tensor]], *,
                    main_process: bool = True, barrier: Callable[[], None] | None = None,
                    any_process: Callable[[bool], bool] | None = None) -> dict:
    """The cached values, computing and storing them first when the key is new. With several
    processes only the main one computes; the others wait at ``barrier`` and then read. With
    ``any_process`` (a sharded model, whose forwards need every process; it tells whether a
    condition holds on any process) every process computes when any lacks the values, and the
    main one stores them."""
    values = cache.load(n)

    def computed(where: str) -> dict:
        t0 = time.time()
        out = compute()
        if main_process:
            cache.save(out, n)
            COUNTERS["computed"] += 1
            log.info("reference log-probs: computed for %d pairs in %.1fs%s, cached in %s", n, time.time() - t0,
                     where, cache.dir)
        return out

    def loaded() -> dict:
        COUNTERS["loaded"] += 1
        log.info("reference log-probs: loaded %d pairs from %s", n, cache.dir)
        return values

    if any_process is not None:   # every process computes when any lacks the values
        values = computed(" on every process") if any_process(values is None) else loaded()
    elif values is None:          # the main process computes, the others read what it stored
        if main_process:
            values = computed("")
        if barrier is not None:
            barrier()
        if not main_process:
            values = cache.load(n)
            if values is None:
                raise RuntimeError(f"{cache.dir}: the main process did not store the reference log-probs "
                                   "(is ref_cache_dir on a file system every process sees?)")
        return values
    else:
        values = loaded()
    if barrier is not None:
        barrier()
    return values


def compute_values(method, examples, collate, batch_size: int, device) -> dict[str, torch.Tensor]:
    """One pass of ``method.reference_quantities`` over ``examples`` in order -> (N,) tensors."""
    chunks: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size]).to(device)
        q = method.reference_quantities(batch)
        for k, v in q.items():
            chunks.setdefault(k, []).append(v.detach().float().cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}
