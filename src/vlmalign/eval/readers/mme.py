"""MME's release folder (Fu et al., 2023): one folder per subtask, each image with a .txt of
``question<TAB>Yes|No`` lines, either in ``images/`` + ``questions_answers_YN/`` or side by side."""

from __future__ import annotations

import os
from pathlib import Path

from ...data.schema import ImageRef
from ...errors import DataError
from ..items import EvalItem
from ._util import Loc, question_of, yes_no

IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def subtasks(root: Path) -> list[tuple[Path, Path, Path]]:
    """``(subtask, image folder, txt folder)`` for every subtask folder under ``root``."""
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if (d / "questions_answers_YN").is_dir():
            out.append((d, d / "images", d / "questions_answers_YN"))
        elif any(f.suffix == ".txt" for f in d.iterdir() if f.is_file()):
            out.append((d, d, d))
    return out


def is_mme_dir(path: Path) -> bool:
    return path.is_dir() and bool(subtasks(path))


def read_mme_dir(path: str, image_root: str | None) -> tuple[list[EvalItem], str]:
    root = Path(path)
    if image_root is not None and os.path.realpath(image_root) != os.path.realpath(root):
        raise DataError(f"MME's images are inside its own folder; drop the image root "
                        f"{image_root!r} (or make it the MME folder)", file=str(path))
    found = subtasks(root)
    if not found:
        raise DataError("no MME subtask folders (SUBTASK/questions_answers_YN/*.txt or "
                        "SUBTASK/*.txt beside the images)", file=str(path))
    items = []
    for sub, img_dir, txt_dir in found:
        for txt in sorted(p for p in txt_dir.iterdir() if p.suffix == ".txt" and p.is_file()):
            src = str(txt)
            image = next((img_dir / (txt.stem + e) for e in IMAGE_EXTS
                          if (img_dir / (txt.stem + e)).is_file()), None)
            if image is None:
                raise DataError(f"no image {txt.stem}.jpg or .png in {str(img_dir)!r} for this "
                                "question file", file=src, field="image")
            rel = image.relative_to(root).as_posix()
            group = f"{sub.name}/{image.name}"
            try:
                lines = txt.read_text(encoding="utf-8-sig").splitlines()
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 text ({e})", file=src) from None
            n = 0
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                loc = Loc(src, i)
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) != 2:
                    raise loc.error(f"expected 'question<TAB>answer', got {len(parts)} "
                                    "tab-separated parts", "question")
                n += 1
                items.append(EvalItem(
                    id=f"{group}#{n}", question=question_of(parts[0], loc, "question"),
                    images=[ImageRef(path=rel)],
                    answer=yes_no(parts[1], loc, "answer"), category=sub.name, group=group,
                    source=src, index=i))
    return items, str(root)
