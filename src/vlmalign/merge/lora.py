"""Merging LoRA adapters as weight updates.

Each adapter ``i`` changes a Linear weight by ``ΔW_i = s_i · B_i @ A_i``; the merge combines the
``ΔW_i`` (mean: ``ΔW = Σ_i w_i ΔW_i / Σ_i w_i``), never the factors: ``mean(B) @ mean(A)`` is not
``mean(B @ A)``. The result is either added to the base weights (``merged``: a full model) or
refactorised into a rank-R LoRA by truncated SVD (``rank:R``), whose relative Frobenius error
``||ΔW - B'A'||_F / ||ΔW||_F`` is reported (zero when R >= the rank of ΔW).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..files import atomic_dir, write_json
from ..models.peft import EXTRA_PARAMS
from .adapters import A_KEY, B_KEY, PREFIX, WEIGHTS, LoraAdapter, check_adapters, read_adapter
from .methods import TASK_METHODS, MergeError, MergeSpec, merge_one, resolve
from .report import MergeReport
from .store import copy_side_files


def parse_lora_out(text: str) -> int | None:
    """``merged`` -> None; ``rank:R`` -> R."""
    if text == "merged":
        return None
    m = re.fullmatch(r"rank:(\d+)", text)
    if not m or int(m.group(1)) < 1:
        raise MergeError(f"--lora-out {text!r}: use merged (into the base model) or rank:R (a LoRA of rank R >= 1)")
    return int(m.group(1))


def merge_adapters(inputs: list[str], out: str, spec: MergeSpec, *, base: str | None = None,
                   lora_out: str = "merged", trust_remote_code: bool = False) -> MergeReport:
    """Merge the LoRA adapter directories ``inputs`` into ``out`` (written atomically): a full model
    (``lora_out="merged"``) or an adapter of rank R (``"rank:R"``). ``base``: where the adapters' base
    model is (default: the one they name)."""
    from ..models.peft import adapter_base
    rank = parse_lora_out(lora_out)
    spec = resolve(spec, len(inputs))
    adapters = [read_adapter(p) for p in inputs]
    notes = check_adapters(adapters, base)
    base_path = adapter_base(inputs[0], base)
    report = MergeReport(out=str(out), kind="lora", spec=spec, inputs=[str(p) for p in inputs], base=base_path,
                         lora_out=lora_out, notes=notes)
    ranks = sorted({ad.rank() for ad in adapters})
    if len(ranks) > 1:
        report.notes.append(f"the adapters have ranks {', '.join(map(str, ranks))}: their updates were merged")
    need_base = rank is None or (spec.method in TASK_METHODS and (adapters[0].full or adapters[0].extra))
    model, processor = _load_base(base_path, trust_remote_code) if need_base else (None, None)
    base_sd = model.state_dict() if model is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)   # dare's random drops
        deltas = merge_updates(spec, adapters)
        full = _merge_full(spec, adapters, "full", base_sd, base_path)
        extra = _merge_full(spec, adapters, "extra", base_sd, base_path)
    report.tensors = len(deltas) + len(full) + len(extra)
    with atomic_dir(out) as tmp:
        if rank is None:
            _write_merged(tmp, model, processor, base_sd, deltas, {**full, **extra}, adapters[0], base_path)
        else:
            _write_rank(tmp, rank, deltas, full, extra, adapters[0], base_path, report)
        report.write(tmp)
    return report


def merge_updates(spec: MergeSpec, adapters: list[LoraAdapter]) -> dict[str, torch.Tensor]:
    """The merged update ``ΔW`` of every module (float32): the method applied to the members' updates
    ``s_i · B_i @ A_i``; task methods take them as differences from the base, i.e. from a zero update."""
    out = {}
    for m in adapters[0].lora:
        ds = [ad.delta(m) for ad in adapters]
        zero = torch.zeros_like(ds[0]) if spec.method in TASK_METHODS else None
        out[m] = merge_one(spec, m, ds, zero, [ad.file for ad in adapters])
    return out


def _merge_full(spec, adapters, which: str, base_sd: dict, base_path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in getattr(adapters[0], which):
        base = None
        if spec.method in TASK_METHODS:
            if name not in base_sd:
                raise MergeError(f"{base_path}: the base model has no tensor {name} (trained in full by "
                                 f"{adapters[0].path}): is it the model the adapters were trained on?")
            base = base_sd[name]
        out[name] = merge_one(spec, name, [getattr(ad, which)[name] for ad in adapters], base,
                              [ad.path for ad in adapters] + [base_path])
    return out


def _load_base(base_path: str, trust_remote_code: bool):
    from ..models.loading import load_model_and_processor
    return load_model_and_processor(base_path, trust_remote_code=trust_remote_code, dtype="auto")


def _write_merged(tmp: Path, model, processor, base_sd, deltas, full, first: LoraAdapter, base_path) -> None:
    """The base model with the merged updates added and the fully trained tensors replaced."""
    from ..models.loading import load_processor
    from ..models.prompt_layout import read_layout, write_layout
    with torch.no_grad():
        for m, d in deltas.items():
            w = base_sd.get(m + ".weight")
            if w is None or tuple(w.shape) != tuple(d.shape):
                got = "no such weight" if w is None else f"shape {list(w.shape)}"
                raise MergeError(f"{base_path}: {m}.weight ({got}) does not take the update {list(d.shape)} of "
                                 f"{first.file}: is it the model the adapters were trained on?")
            w.add_(d.to(w.dtype))
        for name, t in full.items():
            if name not in base_sd or tuple(base_sd[name].shape) != tuple(t.shape):
                raise MergeError(f"{base_path}: the base model has no tensor {name} of shape {list(t.shape)} "
                                 f"(trained in full by {first.path}): is it the model the adapters were trained on?")
            base_sd[name].copy_(t)
    model.save_pretrained(tmp, safe_serialization=True)
    try:  # the adapter directory normally carries the processor (it may have new tokens)
        processor = load_processor(str(first.path))
    except Exception:  # noqa: BLE001 - no processor files beside the adapter: the base's
        pass
    processor.save_pretrained(tmp)
    write_layout(tmp, read_layout(first.path))


def factorise(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(A, B, err², norm²)``: ``B @ A`` (``A``: rank x in, ``B``: out x rank) is the best rank-``rank``
    approximation of ``delta`` (truncated SVD, the singular values split evenly between the factors);
    ``err² = ||delta - B @ A||_F²`` is the sum of the dropped squared singular values."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = torch.zeros(rank, delta.shape[1])
    b = torch.zeros(delta.shape[0], rank)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root
    return a, b, float((s[k:].double() ** 2).sum()), float((s.double() ** 2).sum())


def _write_rank(tmp: Path, rank: int, deltas, full, extra, first: LoraAdapter, base_path: str,
                report: MergeReport) -> None:
    """A LoRA adapter of rank ``rank`` (lora_alpha = rank, so its scaling is 1) holding the
    refactorised updates, beside the merged fully trained tensors."""
    from safetensors.torch import save_file
    dtype = next(iter(first.lora.values()))[0].dtype
    tensors, err_all, norm_all, worst = {}, 0.0, 0.0, (0.0, None)
    for m, d in deltas.items():
        a, b, err, norm = factorise(d, rank)
        tensors[PREFIX + m + A_KEY], tensors[PREFIX + m + B_KEY] = a.to(dtype), b.to(dtype)
        err_all, norm_all = err_all + err, norm_all + norm
        rel = (err / norm) ** 0.5 if norm > 0 else 0.0
        if worst[1] is None or rel > worst[0]:
            worst = (rel, m)
    tensors.update({PREFIX + n: t.contiguous() for n, t in full.items()})
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    if extra:
        save_file({n: t.contiguous() for n, t in extra.items()}, str(tmp / EXTRA_PARAMS))
    cfg = {**first.config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
           "alpha_pattern": {}, "base_model_name_or_path": base_path}
    write_json(tmp / "adapter_config.json", cfg)
    copy_side_files(first.path, tmp, skip=("adapter_config.json", "README.md"))
    report.relative_error = (err_all / norm_all) ** 0.5 if norm_all > 0 else 0.0
    report.max_relative_error, report.worst_module = worst
