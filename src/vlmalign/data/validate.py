"""Check a data file record by record, so bad records are found before training starts.

Per record: everything the reader checks (unknown role, empty or missing response,
``<image>`` count differing from the image count, malformed fields), then each image:
missing or unreadable file, corrupt file (PIL cannot decode it), path escaping the image
root, more pixels than ``max_pixels``; per sample, more images than ``max_images`` or more
pixels together than ``max_sample_pixels`` (both off by default); and, when a model adapter
is given, whether the sequence fits ``max_length`` without cutting image tokens (``adapter.check_length``).
:func:`validate_file` adds what needs the whole file: a file without records, a record id
used before (a problem of the later record), and warnings for usable records worth a look
(a conversation ending with an unanswered user turn), and counts the records that wrote one
``<image>`` for several images (the convention the llava reader expands, see
:mod:`.readers.llava`).

:func:`validate_file` reports every problem; :func:`load_records` is what training uses:
the first bad record raises (``on_error="raise"``) or bad records are dropped, counted and
logged (``on_error="skip"``) -- never silently.

The image root defaults to the folder holding the data file (or the dataset directory).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, ModelError, VlmalignError
from .images import (DEFAULT_MAX_PIXELS, check_image_root, check_max_pixels, check_sample_images,
                     load_image)
from .readers import NO_RECORDS, iter_records
from .schema import UNANSWERED_END, ImageRef, Record, unanswered_end

log = logging.getLogger(__name__)


@dataclass
class Problem:
    """One thing wrong with a record (``index`` None: with the file as a whole)."""

    index: int | None
    field: str | None
    reason: str
    file: str | None = None

    @staticmethod
    def of(err: DataError, file: str | None = None) -> "Problem":
        return Problem(err.index, err.field, err.reason, err.file or file)

    def error(self) -> DataError:
        return DataError(self.reason, file=self.file, index=self.index, field=self.field)

    @property
    def message(self) -> str:
        return self.error().format()

    def to_json(self) -> dict:
        return {"index": self.index, "field": self.field, "reason": self.reason,
                "message": self.message}


@dataclass
class ValidationReport:
    file: str
    records: int = 0  # records seen, good and bad
    problems: list[Problem] = field(default_factory=list)
    # usable records worth a look (a conversation ending with an unanswered user turn)
    warnings: list[Problem] = field(default_factory=list)
    # records whose one <image> stood for several images (expanded by the reader)
    one_placeholder: int = 0

    @property
    def bad_indices(self) -> list[int]:
        return sorted({p.index for p in self.problems if p.index is not None})

    @property
    def bad(self) -> int:
        return len(self.bad_indices)

    @property
    def file_problems(self) -> list[Problem]:
        return [p for p in self.problems if p.index is None]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        s = f"{self.records} records, {self.bad} bad"
        if self.warnings:
            s += f", {len(self.warnings)} with warnings"
        if self.one_placeholder:
            s += f", {self.one_placeholder} with one <image> for several images"
        if any(p.reason != NO_RECORDS for p in self.file_problems):
            s += " (the file could not be read completely)"
        return s

    def to_json(self) -> dict:
        return {"file": self.file, "records": self.records, "bad": self.bad, "ok": self.ok,
                "one_placeholder": self.one_placeholder,
                "problems": [p.to_json() for p in self.problems],
                "warnings": [p.to_json() for p in self.warnings]}


@dataclass
class LoadedRecords:
    """Records that passed the checks, and the problems of those that were skipped."""

    records: list[Record]
    problems: list[Problem]
    total: int

    @property
    def skipped(self) -> int:
        return len({p.index for p in self.problems})


def default_image_root(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


class _ImageChecker:
    """Loads each distinct image once; remembers failures by image identity."""

    def __init__(self, root: str | os.PathLike, keep: bool, max_pixels: int | None):
        self.root = root
        self.keep = keep  # keep decoded images (needed for the length check)
        self.max_pixels = check_max_pixels(max_pixels)
        self.failures: dict[str, str] = {}
        self.sizes: dict[str, tuple[int, int]] = {}  # (width, height) of the good ones

    def check(self, ref: ImageRef) -> tuple[Any, str | None]:
        key = ref.key()
        if key in self.failures:
            return None, self.failures[key]
        try:
            img = load_image(ref, self.root, max_pixels=self.max_pixels)
        except DataError as e:
            self.failures[key] = e.reason
            return None, e.reason
        self.sizes[key] = img.size
        return (img if self.keep else None), None


def _record_images(rec: Record) -> list[tuple[str, ImageRef]]:
    out = [(f"images[{i}]", ref) for i, ref in enumerate(rec.images)]
    for i, ref in enumerate(getattr(rec, "rejected_images", None) or []):
        out.append((f"rejected_images[{i}]", ref))
    return out


def _sample_problems(rec: Record, index: int, src: str, images: "_ImageChecker | None",
                     max_images: int | None, max_sample_pixels: int | None) -> list[Problem]:
    """The per-sample caps, for the prompt's images and the rejected side's (each one
    sequence). The pixel budget needs every image of the sample opened (``images``; one that
    failed is a problem of its own already); the count does not."""
    out = []
    for fname, refs in (("images", rec.images),
                        ("rejected_images", getattr(rec, "rejected_images", None) or [])):
        if not refs:
            continue
        try:
            check_sample_images([(0, 0)] * len(refs), max_images=max_images, field=fname)
            if (max_sample_pixels is not None and images is not None
                    and all(r.key() in images.sizes for r in refs)):
                check_sample_images([images.sizes[r.key()] for r in refs], field=fname,
                                    max_sample_pixels=max_sample_pixels)
        except DataError as e:
            out.append(Problem(index, e.field, e.reason, src))
    return out


def check_records(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                  format: str = "auto", kind: str | None = None, check_images: bool = True,
                  adapter: Any = None, max_length: int | None = None,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, max_images: int | None = None,
                  max_sample_pixels: int | None = None
                  ) -> Iterator[tuple[int | None, Record | None, list[Problem]]]:
    """Yield ``(index, record, problems)`` per record (record None: the reader refused it);
    a file-level failure is yielded last as ``(None, None, [problem])``. ``max_pixels``: the
    pixel budget of :func:`.images.load_image`; ``max_images`` / ``max_sample_pixels``: the
    per-sample caps of :func:`.images.check_sample_images` (the second needs the images
    opened: refused with ``check_images=False`` and no adapter)."""
    if adapter is not None and not max_length:
        raise VlmalignError("a length check needs max_length")
    check_max_pixels(max_images, "max_images", "images")
    check_max_pixels(max_sample_pixels, "max_sample_pixels", "pixels")
    if max_sample_pixels is not None and not check_images and adapter is None:
        raise VlmalignError("max_sample_pixels needs the images opened (their sizes are read "
                            "from them): drop --no-images or the per-sample budget")
    src = str(path)
    if check_images or adapter is not None:
        check_image_root(image_root)  # once, up front (the default root is the file's folder)
    root = image_root if image_root is not None else default_image_root(path)
    images = _ImageChecker(root, keep=adapter is not None, max_pixels=max_pixels)
    try:
        for index, rec in iter_records(path, format=format, kind=kind):
            if isinstance(rec, DataError):
                yield index, None, [Problem.of(rec, src)]
                continue
            problems, pil = [], []
            if check_images or adapter is not None:
                for fname, ref in _record_images(rec):
                    img, reason = images.check(ref)
                    if reason is not None:
                        problems.append(Problem(index, fname, reason, src))
                    elif fname.startswith("images"):
                        pil.append(img)
            opened = images if (check_images or adapter is not None) else None
            problems += _sample_problems(rec, index, src, opened, max_images, max_sample_pixels)
            if adapter is not None and not problems:
                try:
                    adapter.check_length(rec, pil, max_length)
                except DataError as e:
                    problems.append(Problem(index, e.field or "length", e.reason, src))
                except (ModelError, ValueError) as e:
                    # the model's processor or template refuses this record (e.g. Qwen2-VL's
                    # image processor raises ValueError for an aspect ratio over 200): report
                    # it with the record instead of stopping the whole check
                    problems.append(Problem(index, "model", f"the model cannot process this record "
                                                            f"({type(e).__name__}: {e})", src))
            yield index, rec, problems
    except DataError as e:
        yield None, None, [Problem.of(e, src)]


class DuplicateIds:
    """Record ids seen so far: :meth:`earlier` gives the index of the first record that had
    the same id (None: a new id, or no id)."""

    def __init__(self):
        self.first: dict[str, int | None] = {}

    def earlier(self, rec: Record | None) -> int | None:
        if rec is None or rec.id is None:
            return None
        first = self.first.setdefault(rec.id, rec.index)
        return None if first == rec.index else first


def validate_file(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                  format: str = "auto", kind: str | None = None, check_images: bool = True,
                  max_length: int | None = None, adapter: Any = None,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, max_images: int | None = None,
                  max_sample_pixels: int | None = None) -> ValidationReport:
    """Check every record of ``path``; never stops at the first problem.

    A loaded model ``adapter`` (anything with ``check_length(record, images, max_length)``;
    the caller loads it) turns on the length check at ``max_length``. Two records with the
    same id are a problem of the later one. A conversation that ends with an unanswered user
    turn is a warning (it stays usable).
    """
    if max_length and adapter is None:
        raise VlmalignError("max_length needs a model: its tokenizer and processor count "
                            "the tokens")
    report, ids = ValidationReport(str(path)), DuplicateIds()
    for index, rec, problems in check_records(path, image_root, format=format, kind=kind,
                                              check_images=check_images, adapter=adapter,
                                              max_length=max_length, max_pixels=max_pixels,
                                              max_images=max_images,
                                              max_sample_pixels=max_sample_pixels):
        if index is not None:
            report.records += 1
        if rec is not None and rec.one_placeholder_for:
            report.one_placeholder += 1
        first = ids.earlier(rec)
        if first is not None:
            problems = problems + [Problem(index, "id", f"duplicate id {rec.id!r} (also "
                                                        f"record {first})", str(path))]
        report.problems.extend(problems)
        if unanswered_end(rec):
            report.warnings.append(Problem(index, f"messages[{len(rec.messages) - 1}]",
                                           UNANSWERED_END, str(path)))
    return report


def load_records(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 on_error: str = "raise", *, format: str = "auto", kind: str | None = None,
                 check_images: bool = True, adapter: Any = None,
                 max_length: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, max_images: int | None = None,
                 max_sample_pixels: int | None = None) -> LoadedRecords:
    """Records of ``path`` that pass :func:`validate_file`'s checks, for training.

    ``on_error="raise"``: the first bad record raises :class:`DataError` (same message as
    validate). ``on_error="skip"``: bad records are dropped; they are counted in
    ``.skipped``, listed in ``.problems`` and logged as a warning. A file-level failure
    (unreadable file, JSON syntax error) always raises.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    records, problems, total = [], [], 0
    for index, rec, probs in check_records(path, image_root, format=format, kind=kind,
                                           check_images=check_images, adapter=adapter,
                                           max_length=max_length, max_pixels=max_pixels,
                                           max_images=max_images,
                                           max_sample_pixels=max_sample_pixels):
        if index is None:
            raise probs[0].error()
        total += 1
        if probs:
            if on_error == "raise":
                raise probs[0].error()
            problems.extend(probs)
        else:
            records.append(rec)
    out = LoadedRecords(records, problems, total)
    if out.skipped:
        log.warning("%s: skipped %d of %d records; first: %s", path, out.skipped, total,
                    problems[0].message)
    return out
