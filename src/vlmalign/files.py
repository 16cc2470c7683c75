"""Atomic file writes (temp file + rename): a run killed mid-write leaves the old file or the new one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


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
