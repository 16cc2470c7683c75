"""DeepSpeed ZeRO-3's partitioned parameters, for code that reads or writes weights.

Under ZeRO-3 (an accelerate launch with ``configs/accelerate/zero3.yaml`` once the model is
prepared, or a model built inside ``deepspeed.zero.Init``) each parameter holds only its shard:
the tensor itself is empty (``torch.Size([0])``), its full shape is ``ds_shape`` and its state
``ds_status``. Reading it (``torch.equal``, ``.shape``, ``state_dict()``) or copying into it
needs the full tensor gathered first, with every process taking part
(``deepspeed.zero.GatheredParameters``). Everything here is a no-op for ordinary parameters,
so deepspeed is imported only when a partitioned one is met.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch


def is_partitioned(p) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter (it has ``ds_status``; its data may be a shard)."""
    return hasattr(p, "ds_status") and hasattr(p, "ds_id")


def full_shape(p) -> torch.Size:
    """A parameter's full shape, partitioned or not."""
    return p.ds_shape if is_partitioned(p) else p.shape


def partitioned(params: Iterable) -> list:
    return [p for p in params if is_partitioned(p)]


@contextlib.contextmanager
def gathered(params: Iterable, *, modifier_rank: int | None = None):
    """Inside: the ZeRO-3 parameters among ``params`` hold their full data on every process
    (every process must enter with the same parameters). ``modifier_rank``: the process whose
    writes to them are kept and partitioned again on exit (None: read only). Ordinary
    parameters pass through untouched."""
    ps = partitioned(params)
    if not ps:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(ps, modifier_rank=modifier_rank):
        yield


def any_partitioned(module: torch.nn.Module) -> bool:
    return any(is_partitioned(p) for p in module.parameters())
