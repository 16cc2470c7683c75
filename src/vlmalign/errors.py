"""Errors that name exactly what is wrong: file, record and field."""

from __future__ import annotations


class VlmalignError(Exception):
    """Base class for errors vlmalign raises on purpose (shown without a traceback by the CLI)."""


class DataError(VlmalignError):
    """A record that cannot be used, with its location.

    ``str(err)`` reads ``FILE: record INDEX: field FIELD: REASON`` (parts that are unknown are
    left out), so every message points at the exact spot to fix.
    """

    def __init__(self, reason: str, *, file: str | None = None, index: int | None = None,
                 field: str | None = None):
        self.reason = reason
        self.file = file
        self.index = index
        self.field = field
        super().__init__(self.format())

    def format(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(str(self.file))
        if self.index is not None:
            parts.append(f"record {self.index}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        parts.append(self.reason)
        return ": ".join(parts)

    def located(self, *, file: str | None = None, index: int | None = None,
                field: str | None = None) -> "DataError":
        """A copy of the same class with missing location parts filled in (existing ones win)."""
        return type(self)(self.reason, file=self.file if self.file is not None else file,
                         index=self.index if self.index is not None else index,
                         field=self.field if self.field is not None else field)


class ModelError(VlmalignError):
    """A model directory or configuration that vlmalign cannot use."""


class LengthError(DataError):
    """A sample that does not fit the length limit without cutting image tokens or the response."""
