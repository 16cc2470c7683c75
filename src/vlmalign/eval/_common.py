"""Small helpers shared by the benchmark scorers (input checks, safe division)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def check_same_length(**seqs: Sequence) -> int:
    """Length shared by all the named sequences; ValueError naming them if they differ."""
    lengths = {name: len(s) for name, s in seqs.items() if s is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError("length mismatch: " + ", ".join(f"{k}={v}" for k, v in lengths.items()))
    return next(iter(lengths.values()), 0)


def field(record: Any, index: int, name: str) -> Any:
    """``record[name]``; ValueError naming the item index and field when it is missing/None."""
    if not isinstance(record, Mapping):
        raise ValueError(f"item {index}: expected a dict, got {type(record).__name__}")
    value = record.get(name)
    if value is None:
        raise ValueError(f"item {index}: missing field {name!r}")
    return value


def ratio(num: float, den: float) -> float:
    """num / den, or NaN when the denominator is zero (an undefined metric, not 0)."""
    return num / den if den else float("nan")
