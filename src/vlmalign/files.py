"""Atomic file writes (temp file + rename): a run killed mid-write leaves the old file or the new one."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON at ``path``."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False))


def write_lines(path: str | Path, objs: Iterable[dict]) -> None:
    """One JSON object per line."""
    write_text(path, "".join(json.dumps(o) + "\n" for o in objs))


def write_text(path: str | Path, text: str) -> None:
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield ``.tmp-NAME`` beside ``final`` to write a directory into; it becomes ``final`` (replacing
    an earlier one) only when the block ends without an error, and is removed when it raises."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
