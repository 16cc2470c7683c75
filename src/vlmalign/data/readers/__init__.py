"""Readers: every supported file format -> records of the internal schema.

A file is a *container* (``.json``, ``.jsonl``, ``.parquet``, a ``datasets`` directory) of
raw records in one *layout* (the format names below). Both are detected automatically;
``format=`` forces the layout.

==============  ==========================================================================
format          layout (see each module's docstring)
==============  ==========================================================================
vlmalign        native JSON Lines, lossless for every kind (:mod:`.native`)
llava           LLaVA conversations; ``vlquery_json`` (Resonance) is the same layout with
                user/assistant roles; the ranked variant gives RankedList (:mod:`.llava`)
paddlemix       PaddleMIX ``[user, assistant]`` pairs (:mod:`.paddlemix`)
plain_dpo       Resonance image/prompt/chosen/rejected (:mod:`.plain_dpo`)
vqa             image/question/answer (:mod:`.vqa`)
trl             Hugging Face / TRL columns: messages, prompt/chosen/rejected, ... (:mod:`.trl`)
==============  ==========================================================================

Every record gets ``source`` (the path as given) and ``index`` (its position in the file), and
passes :func:`vlmalign.data.schema.check_record`. Malformed records raise :class:`DataError`
naming file, record and field; :func:`iter_records` yields them instead of raising, so a
checker can go on. A file without any record (empty, blank, ``[]``) raises
:class:`NoRecordsError` (``FILE: no records``) once it has been read through.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from ...errors import DataError
from ..kinds import coerce
from ..schema import RECORD_KINDS, Record, check_record
from . import llava, native, paddlemix, plain_dpo, trl, vqa
from ._common import Ctx, type_name
from ._containers import container_of, iter_raw

# detection order matters: the first layout whose `matches` accepts the first record wins
LAYOUTS = {"vlmalign": native, "llava": llava, "paddlemix": paddlemix, "plain_dpo": plain_dpo,
           "vqa": vqa, "trl": trl}
ALIASES = {"native": "vlmalign", "vlquery_json": "llava", "sharegpt": "llava", "hf": "trl",
           "parquet": "trl", "dpo": "plain_dpo", "resonance_dpo": "plain_dpo"}
FORMATS = tuple(LAYOUTS)
NO_RECORDS = "no records"


class NoRecordsError(DataError):
    """A file that holds no record at all: ``NoRecordsError(path)`` reads ``PATH: no records``."""

    def __init__(self, reason: str | os.PathLike = NO_RECORDS, *, file: str | None = None,
                 index: int | None = None, field: str | None = None):
        if file is None and reason != NO_RECORDS:  # NoRecordsError(path)
            reason, file = NO_RECORDS, str(reason)
        super().__init__(str(reason), file=file, index=index, field=field)


def canonical_format(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in LAYOUTS:
        known = ", ".join(list(LAYOUTS) + sorted(ALIASES))
        raise DataError(f"unknown format {name!r} (known: {known})")
    return name


def detect_layout(obj: Mapping) -> str | None:
    """The layout whose fields a raw record has, or None."""
    if not isinstance(obj, Mapping):
        return None
    for name, mod in LAYOUTS.items():
        if mod.matches(obj):
            return name
    return None


def detect_format(path: str | os.PathLike) -> str:
    """Name of the layout of ``path`` (one of :data:`FORMATS`), from its first record.

    Raises :class:`DataError` for unreadable files, empty files and unknown layouts.
    """
    for index, obj in iter_raw(path):
        if isinstance(obj, DataError):
            continue  # a broken line: look at the next one
        name = detect_layout(obj)
        if name is None:
            keys = sorted(obj)[:12] if isinstance(obj, Mapping) else type_name(obj)
            raise DataError(f"cannot detect the format from record {index} (fields: {keys}); "
                            f"pass a format (one of {', '.join(FORMATS)})", file=str(path))
        return name
    raise DataError("no records in file: cannot detect the format", file=str(path))


def iter_records(path: str | os.PathLike, *, format: str = "auto",
                 kind: str | None = None) -> Iterator[tuple[int, Record | DataError]]:
    """Yield ``(index, record)`` or ``(index, DataError)`` for each record of ``path``.

    Errors that concern the whole file (missing file, JSON syntax error in a ``.json`` list,
    unknown format) are raised, not yielded; so is :class:`NoRecordsError` after the last
    line of a file without records. ``kind`` converts each record (see
    :mod:`vlmalign.data.kinds`); records that cannot be converted are yielded as errors.
    """
    if kind is not None and kind not in RECORD_KINDS:
        raise DataError(f"unknown kind {kind!r} (expected one of {', '.join(RECORD_KINDS)})")
    container_of(path)  # fail early on missing paths
    layout = None if format == "auto" else LAYOUTS[canonical_format(format)]
    src = str(path)
    seen = False
    for index, obj in iter_raw(path):
        seen = True
        if isinstance(obj, DataError):
            yield index, obj
            continue
        if layout is None:  # auto: the first readable record decides, in a single pass
            name = detect_layout(obj)
            if name is None:
                keys = sorted(obj)[:12] if isinstance(obj, Mapping) else type_name(obj)
                raise DataError(f"cannot detect the format from record {index} (fields: "
                                f"{keys}); pass a format (one of {', '.join(FORMATS)})", file=src)
            layout = LAYOUTS[name]
        ctx = Ctx(src, index, kind)
        try:
            if not isinstance(obj, Mapping):
                raise ctx.error(f"expected a JSON object, got {type_name(obj)}")
            rec = ctx.stamp(layout.parse(obj, ctx))
            check_record(rec, as_prompt=kind == "rl_prompt")
            if kind is not None:
                rec = coerce(rec, kind)
                check_record(rec)
        except DataError as e:
            yield index, e.located(file=src, index=index)
            continue
        yield index, rec
    if not seen:
        raise NoRecordsError(src)


def read_file(path: str | os.PathLike, *, format: str = "auto",
              kind: str | None = None) -> list[Record]:
    """All records of ``path``; the first malformed record raises :class:`DataError`."""
    out = []
    for _, rec in iter_records(path, format=format, kind=kind):
        if isinstance(rec, DataError):
            raise rec
        out.append(rec)
    return out


__all__ = ["FORMATS", "NoRecordsError", "canonical_format", "detect_format", "iter_records",
           "read_file"]
