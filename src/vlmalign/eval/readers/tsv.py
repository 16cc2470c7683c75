"""VLMEvalKit's benchmark TSV (``$LMUData/NAME.tsv``) and its tabular result files."""

from __future__ import annotations

import ast
import csv
import sys
from pathlib import Path

from ...data.schema import ImageRef
from ...errors import DataError
from ..items import EvalItem
from ._util import (Loc, blank, check_choice, decode_b64, default_root, path_image,
                    question_of, text_or_none)

OPTION_COLUMNS = tuple(chr(ord("A") + i) for i in range(26))
USED = {"index", "image", "image_path", "question", "hint", "answer", "category", "split",
        *OPTION_COLUMNS}


def read_table(path: str, delimiter: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a delimited text file (UTF-8; base64 cells may be megabytes)."""
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise DataError("empty file: no header line", file=path)
            rows = []
            for i, cells in enumerate(reader):
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise DataError(f"{len(cells)} cells where the header has {len(header)} "
                                    "columns", file=path, index=len(rows))
                rows.append(dict(zip(header, cells)))
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e}); save the file as UTF-8", file=path) from None
    return header, rows


def _image_list(value: str) -> list[str]:
    """One base64 string, or VLMEvalKit's ``"['b64', 'b64']"`` for several (``toliststr``)."""
    v = value.strip()
    if v.startswith("[") and v.endswith("]"):
        try:
            parsed = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return [v]
        if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
            return parsed
    return [v]


def read_vlmevalkit_tsv(path: str, image_root: str | None) -> tuple[list[EvalItem], str | None]:
    header, rows = read_table(path, "\t")
    src = str(path)
    for col in ("index", "question"):
        if col not in header:
            raise DataError(f"missing column (VLMEvalKit TSVs have index, image, question, ...; "
                            f"this one has {header})", file=src, field=col)
    if "image" not in header and "image_path" not in header:
        raise DataError(f"missing column: a VLMEvalKit TSV has base64 images in 'image' (or "
                        f"paths in 'image_path'); this one has {header}", file=src, field="image")
    option_cols = [c for c in OPTION_COLUMNS if c in header]
    use_b64 = "image" in header
    root = None if use_b64 else default_root(path, image_root)
    # VLMEvalKit: a cell of <= 64 characters is the index of the row that holds the image.
    by_index = {r["index"].strip(): r.get("image", "") for r in rows} if use_b64 else {}
    items = []
    for i, row in enumerate(rows):
        loc = Loc(src, i)
        index = row["index"].strip()
        if not index:
            raise loc.error("empty index", "index")
        question = question_of(row["question"], loc, "question")
        if use_b64:
            cell = row["image"].strip()
            if not cell:
                raise loc.error("empty image cell", "image")
            if len(cell) <= 64:
                target = by_index.get(cell)
                if target is None:
                    raise loc.error(f"image refers to index {cell!r}, which no row has", "image")
                if len(target.strip()) <= 64:
                    raise loc.error(f"image refers to index {cell!r}, whose image is itself a "
                                    "reference, not image data", "image")
                cell = target
            images = [ImageRef(data=decode_b64(b, loc, "image")) for b in _image_list(cell)]
        else:
            images = [path_image(p, root, loc, "image_path")
                      for p in _image_list(row["image_path"])]
        options = {c: row[c] for c in option_cols if not blank(row[c])}
        answer = text_or_none(row.get("answer"))
        if options:
            answer = check_choice(answer, options, loc, "answer")
        elif answer is not None and answer.strip().lower() in ("yes", "no"):
            answer = answer.strip().lower()
        try:
            group = str(int(index) % 1_000_000)
        except ValueError:
            group = index
        meta = {k: v for k, v in row.items() if k not in USED and not blank(v)}
        if use_b64 and not blank(row.get("image_path")):
            meta["image_path"] = row["image_path"]
        items.append(EvalItem(
            id=index, question=question, images=images, answer=answer,
            options=options or None, category=text_or_none(row.get("category")), group=group,
            split=text_or_none(row.get("split")), hint=text_or_none(row.get("hint")),
            meta=meta, source=src, index=i))
    return items, root


def tabular_predictions(path: str) -> list[tuple[int, str, str]]:
    """``(row, index, prediction)`` from a VLMEvalKit result file (.xlsx, .tsv or .csv)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".xlsx":
        try:
            import openpyxl  # noqa: F401  (pandas needs it for .xlsx)
            import pandas as pd
        except ImportError:
            raise DataError("reading .xlsx result files needs pandas and openpyxl (pip install "
                            "pandas openpyxl); or save the sheet as .csv or .tsv",
                            file=path) from None
        try:
            df = pd.read_excel(path, dtype=str, keep_default_na=False)
        except Exception as e:  # openpyxl raises several types for broken files
            raise DataError(f"cannot read the spreadsheet ({e.__class__.__name__}: {e})",
                            file=path) from None
        header = [str(c) for c in df.columns]
        rows = [dict(zip(header, map(str, r))) for r in df.itertuples(index=False)]
    else:
        header, rows = read_table(path, "\t" if suffix == ".tsv" else ",")
    for col in ("index", "prediction"):
        if col not in header:
            raise DataError(f"missing column (a VLMEvalKit result file has index and prediction; "
                            f"this one has {header})", file=path, field=col)
    out = []
    for i, row in enumerate(rows):
        index = row["index"].strip()
        if not index:
            raise DataError("empty index", file=path, index=i, field="index")
        out.append((i, index, row["prediction"]))
    return out
