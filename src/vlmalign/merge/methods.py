"""The merge methods: what each one takes, checked up front, and the per-tensor call into mergekit.

Every method is mergekit's per-tensor implementation (``mergekit.merge_methods.merge_tensors``),
called on one tensor at a time; vlmalign reads, checks and writes the checkpoints around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import VlmalignError

# our name -> mergekit's
MERGEKIT_NAME = {"mean": "linear", "weighted": "linear", "task-arithmetic": "task_arithmetic",
                 "ties": "ties", "dare": "dare_linear", "dare-ties": "dare_ties", "slerp": "slerp"}
METHODS = tuple(MERGEKIT_NAME)
# methods that merge differences from a base (task vectors)
TASK_METHODS = ("task-arithmetic", "ties", "dare", "dare-ties")
SPARSE_METHODS = ("ties", "dare", "dare-ties")
DEFAULT_DENSITY = 0.5
DEFAULT_T = 0.5


class MergeError(VlmalignError):
    """Inputs or options that cannot be merged, with the file and tensor at fault."""


@dataclass(frozen=True)
class MergeSpec:
    """One merge: the method and its options. ``weights``: one per input (not counting a base)."""
    method: str
    weights: tuple[float, ...] | None = None
    density: float | None = None
    t: float | None = None
    seed: int = 0


def resolve(spec: MergeSpec, n_inputs: int) -> MergeSpec:
    """``spec`` with its defaults filled in, or an error that names the option at fault."""
    m = spec.method
    if m not in MERGEKIT_NAME:
        raise MergeError(f"unknown merge method {m!r} (use one of {', '.join(METHODS)})")
    if n_inputs < 2 and m != "task-arithmetic":
        raise MergeError(f"--method {m} needs at least 2 inputs, got {n_inputs}")
    if m == "slerp" and n_inputs != 2:
        raise MergeError(f"--method slerp interpolates between exactly 2 inputs, got {n_inputs}")
    if spec.density is not None and m not in SPARSE_METHODS:
        raise MergeError(f"--density is for {', '.join(SPARSE_METHODS)}, not {m}")
    if spec.t is not None and m != "slerp":
        raise MergeError(f"--t is for slerp, not {m}")
    if spec.t is not None and not 0 <= spec.t <= 1:
        raise MergeError(f"--t {spec.t} is out of range (must be in [0, 1])")
    if spec.density is not None and not 0 < spec.density <= 1:
        raise MergeError(f"--density {spec.density} is out of range (must be in (0, 1])")
    weights = _weights(m, spec.weights, n_inputs)
    density = spec.density if spec.density is not None else (DEFAULT_DENSITY if m in SPARSE_METHODS else None)
    t = spec.t if spec.t is not None else (DEFAULT_T if m == "slerp" else None)
    return MergeSpec(m, weights, density, t, spec.seed)


def _weights(method: str, weights, n: int) -> tuple[float, ...] | None:
    if method == "slerp":
        if weights is not None:
            raise MergeError("--weights is not used by slerp (its position between the 2 inputs is --t)")
        return None
    if method == "mean":
        if weights is not None:
            raise MergeError("--method mean weighs every input equally; use --method weighted with --weights")
        return (1.0,) * n
    if weights is None:
        if method == "weighted":
            raise MergeError(f"--method weighted needs --weights, one number per input ({n})")
        return (1.0,) * n     # task vectors added at full strength, as in the task-arithmetic paper
    weights = tuple(float(w) for w in weights)
    if len(weights) != n:
        raise MergeError(f"--weights has {len(weights)} values for {n} inputs: give one per input"
                         + (" (the base has none)" if method in TASK_METHODS else ""))
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"--weights {','.join(map(str, weights))}: every weight must be a finite number")
    if method == "weighted" and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise MergeError(f"--weights {','.join(map(str, weights))}: weighted averaging needs weights >= 0 "
                         "with a positive sum")
    return weights


def combine(spec: MergeSpec, tensors: list[torch.Tensor], base: torch.Tensor | None = None,
            name: str | None = None) -> torch.Tensor:
    """The merge of ``tensors`` (one per input, same shape) by a :func:`resolve`-d ``spec``, in float32
    (float64 inputs stay float64); ``base``: what task methods take the differences from."""
    merge_tensors = _mergekit()
    m = spec.method
    params: dict = {}
    base_index = None
    if m == "slerp":
        params["t"] = spec.t
        base_index = 0
    else:
        params["weight"] = list(spec.weights)
    if m in TASK_METHODS:
        if base is None:
            raise MergeError(f"--method {m} needs a base to take the differences from (--base)")
        tensors = [base, *tensors]
        base_index = 0
    if m in SPARSE_METHODS:
        params["density"] = spec.density
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return merge_tensors(tensors, MERGEKIT_NAME[m], parameters=params, base_index=base_index, name=name,
                         dtype=dtype)


def _mergekit():
    try:
        from mergekit.merge_methods import merge_tensors
    except ImportError as e:
        raise MergeError(f"vlmalign merge uses mergekit's merge methods, which are not installed ({e}): "
                         "pip install 'vlmalign[merge]'") from None
    return merge_tensors


def merge_one(spec: MergeSpec, key: str, tensors: list[torch.Tensor], base: torch.Tensor | None,
              where: list) -> torch.Tensor:
    """The merged value of tensor ``key`` in the inputs' dtype. A tensor that is not floating point
    (an index buffer, say) is not averaged: every input (and the base) must hold the same values.
    ``where``: the file each tensor (then the base's) came from, for the error."""
    if not tensors[0].is_floating_point():
        others = tensors[1:] + ([base] if base is not None else [])
        for t, w in zip(others, where[1:]):
            if not torch.equal(t, tensors[0]):
                raise MergeError(f"{w}: tensor {key} ({t.dtype}) differs from {where[0]}'s and cannot be "
                                 "averaged: integer tensors must be equal in every input")
        return tensors[0]
    out = combine(spec, [t.float() if t.dtype != torch.float64 else t for t in tensors],
                  None if base is None else base.to(torch.float64 if base.dtype == torch.float64 else torch.float32),
                  name=key)
    return out.to(tensors[0].dtype)
