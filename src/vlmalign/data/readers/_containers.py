"""Containers: how raw records are stored, independent of the record layout.

* ``.json`` -- a list of objects (or an object holding that list under ``data``, ``samples``
  or ``examples``); a ``.json`` file that is really JSON Lines is read as such.
* ``.jsonl`` -- one object per line; blank lines are ignored.
* JSON text is UTF-8 (a leading byte order mark is allowed). A byte that is not UTF-8 makes
  its JSON Lines line one bad record; in a ``.json`` file it fails the file, naming the
  byte offset and line.
* ``.parquet`` -- one row per record (images as ``{"bytes", "path"}`` structs).
* a directory written by ``datasets.Dataset.save_to_disk`` (or one split of a
  ``DatasetDict``), or a directory of ``.parquet`` files.

:func:`iter_raw` yields ``(index, object_or_DataError)``: a line that is not valid JSON is a
per-record error; a ``.json`` file with a syntax error fails as a whole (naming the line).
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import DataError

LIST_KEYS = ("data", "samples", "examples")
HF_MARKERS = ("state.json", "dataset_info.json")


def container_of(path: str | os.PathLike) -> str:
    """``json``, ``jsonl``, ``parquet`` or ``hf_dir``; raises :class:`DataError` otherwise."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file or directory: {str(p)!r}", file=str(path))
    if p.is_dir():
        if (p / "dataset_dict.json").exists():
            splits = sorted(d.name for d in p.iterdir() if d.is_dir())
            raise DataError(f"this is a DatasetDict with splits {splits}; pass one split "
                            f"directory, e.g. {str(p / (splits[0] if splits else 'train'))!r}",
                            file=str(path))
        if any((p / m).exists() for m in HF_MARKERS) or sorted(p.glob("*.parquet")):
            return "hf_dir"
        raise DataError("directory is neither a `datasets.save_to_disk` directory nor a folder "
                        "of .parquet files", file=str(path))
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix == ".parquet":
        return "parquet"
    # unknown extension: look at the first non-blank character
    with open(p, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        return "jsonl"
    raise DataError(f"cannot tell the container of {p.name!r} (expected .json, .jsonl, "
                    ".parquet or a datasets directory)", file=str(path))


def iter_raw(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    kind = container_of(path)
    if kind == "json":
        return _iter_json(path)
    if kind == "jsonl":
        return _iter_jsonl(path)
    if kind == "parquet":
        return _iter_parquet([Path(path)])
    return _iter_hf_dir(Path(path))


def json_reason(e: json.JSONDecodeError) -> str:
    """The message of a JSON syntax error as a whole sentence (``json`` ends some with "at",
    to be followed by a position: "Invalid control character at")."""
    return e.msg[:-3] + " here" if e.msg.endswith(" at") else e.msg


def _not_utf8(e: UnicodeDecodeError, where: str) -> str:
    if e.object.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "the file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8"
    return f"byte {e.object[e.start]:#04x} {where} is not valid UTF-8; save the file as UTF-8"


def _iter_jsonl(path) -> Iterator[tuple[int, Any]]:
    src = str(path)
    index = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
                if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                    raise DataError(_not_utf8(UnicodeDecodeError("utf-8", raw, 0, 1, ""), ""),
                                    file=src)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"on line {lineno}, column {e.start + 1}"
                yield index, DataError(_not_utf8(e, where), file=src, index=index)
                index += 1
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = DataError(f"invalid JSON on line {lineno}, column {e.colno}: "
                                f"{json_reason(e)}", file=src, index=index)
            yield index, obj
            index += 1


def _read_text(path) -> str:
    """The whole file as text; bytes that are not UTF-8 fail it, naming offset and line."""
    data = Path(path).read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        where = f"at byte offset {offset} (line {line}, column {column})"
        raise DataError(_not_utf8(e, where), file=str(path)) from None


def _iter_json(path) -> Iterator[tuple[int, Any]]:
    src = str(path)
    text = _read_text(path)
    if not text.strip():
        return  # an empty file: iter_records says "no records"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _iter_jsonl(path)  # JSON Lines saved with a .json name
            return
        raise DataError(f"invalid JSON at line {e.lineno}, column {e.colno}: {json_reason(e)}",
                        file=src) from None
    if isinstance(data, dict):
        lists = [k for k in LIST_KEYS if isinstance(data.get(k), list)]
        if len(lists) != 1:
            raise DataError("expected a JSON list of records (or an object with one of "
                            f"{', '.join(LIST_KEYS)} holding that list), got an object with keys "
                            f"{sorted(data)[:8]}", file=src)
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}", file=src)
    yield from enumerate(data)


def _rows(batches: Iterator, src: str, index: int):
    """``(index, row)`` for the rows of Arrow record batches, then returns the next index. A
    batch that cannot be read (corrupt data pages) fails the file, naming where."""
    while True:
        try:
            batch = next(batches, None)
            rows = [] if batch is None else batch.to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt data
            raise DataError(f"cannot read the records from record {index} on "
                            f"({e.__class__.__name__}: {e})", file=src) from None
        if batch is None:
            return index
        for row in rows:
            yield index, row
            index += 1


def _iter_parquet(files: list[Path], start: int = 0) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    index = start
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # pyarrow raises several types for broken files
            raise DataError(f"cannot read parquet file ({e})", file=str(file)) from None
        index = yield from _rows(pf.iter_batches(batch_size=256), str(file), index)


def _iter_hf_dir(path: Path) -> Iterator[tuple[int, Any]]:
    if not any((path / m).exists() for m in HF_MARKERS):
        yield from _iter_parquet(sorted(path.glob("*.parquet")))
        return
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"cannot load datasets directory ({e.__class__.__name__}: {e})",
                        file=str(path)) from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"this is a DatasetDict with splits {list(ds)}; pass one split directory",
                        file=str(path))
    # Arrow batches keep images as {"bytes", "path"} structs: no decoding, original bytes.
    yield from _rows(iter(ds.with_format("arrow").iter(batch_size=256)), str(path), 0)
