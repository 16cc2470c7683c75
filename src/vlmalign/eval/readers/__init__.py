"""Benchmark readers: public VLM benchmark files in their distributed layouts -> :class:`EvalItem`.

:func:`read_benchmark` reads one benchmark (``layout="auto"`` tells the layout from the path,
see :func:`detect_layout`); :func:`read_predictions` reads a model's answers keyed by item id.
Every malformed input raises :class:`~vlmalign.errors.DataError` naming file, record and field;
no row is skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ...data.readers._containers import HF_MARKERS
from ...errors import DataError
from ..items import EvalItem
from ._util import finish, iter_records, json_objects, kind
from .hallusion import read_hallusionbench
from .hf import read_hf
from .llava import POPE_NAME, read_llava_jsonl, read_pope
from .mme import is_mme_dir, read_mme_dir
from .scienceqa import is_problems, read_problems, read_vla_json
from .tsv import read_vlmevalkit_tsv, tabular_predictions

__all__ = ["Benchmark", "LAYOUTS", "detect_layout", "read_benchmark", "read_predictions"]

LAYOUTS: dict[str, str] = {
    "vlmevalkit_tsv": "VLMEvalKit TSV (index, base64 image, question, hint, A..Z options, answer,"
                      " category): MMBench, SEED-Bench, MME, HallusionBench, POPE, MMStar, ...",
    "hf": "Hugging Face copy (parquet or save_to_disk folder) of POPE, MME, MMBench, ScienceQA, "
          "MMMU or MMStar, recognised by its columns",
    "llava_jsonl": "LLaVA evaluation question JSONL (question_id, image, text, category); "
                   "POPE labels from --answers coco_pope_*.json files or their folder",
    "pope": "POPE annotation file coco_pope_{random,popular,adversarial}.json (question_id, "
            "image, text, label), or a folder of them (pooled, scored per split)",
    "mme_dir": "MME release folder: SUBTASK/images + SUBTASK/questions_answers_YN/*.txt, or "
               "images and .txt side by side (question<TAB>Yes|No)",
    "scienceqa_json": "ScienceQA: Vision-LLM-Alignment test JSON (id, image, conversations, "
                      "label) or the original problems.json",
    "hallusionbench_json": "HallusionBench.json (category, subcategory, visual_input, set_id, "
                           "figure_id, question_id, question, gt_answer, filename)",
}


@dataclass
class Benchmark:
    items: list[EvalItem]
    image_root: str | None   # root the ImageRef paths are relative to (None: images are bytes)
    layout: str              # which layout was read


def _first_record(path: str):
    """The first record of a .json/.jsonl file, or the parsed object of a problems.json."""
    for _, obj in iter_records(path):
        if isinstance(obj, DataError):
            raise obj
        return {"__problems__": True} if is_problems(obj) else obj
    raise DataError("no items: the file holds no records", file=path)


def detect_layout(path: str | os.PathLike) -> str:
    """The layout of ``path``: a folder of MME subtask folders -> mme_dir; a datasets or parquet
    folder, or a .parquet file -> hf; .tsv -> vlmevalkit_tsv; .json/.jsonl by the keys of the
    first record (conversations -> scienceqa_json, gt_answer + visual_input ->
    hallusionbench_json, label -> pope, question_id + text -> llava_jsonl); a problems.json
    object -> scienceqa_json."""
    p = Path(path)
    if not p.exists():
        raise DataError("no such file or directory", file=str(path))
    if p.is_dir():
        if any((p / m).exists() for m in HF_MARKERS) or any(p.glob("*.parquet")):
            return "hf"
        if is_mme_dir(p):
            return "mme_dir"
        if any(POPE_NAME.search(f.name) for f in p.iterdir()):
            return "pope"
        raise DataError("cannot tell the layout of this folder: neither MME subtask folders "
                        "nor a datasets / parquet folder", file=str(path))
    suffix = p.suffix.lower()
    if suffix == ".tsv":
        return "vlmevalkit_tsv"
    if suffix == ".parquet":
        return "hf"
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"cannot tell the layout from the extension {suffix!r}; pass a layout "
                        f"(one of {', '.join(LAYOUTS)})", file=str(path))
    first = _first_record(str(path))
    if not isinstance(first, dict):
        raise DataError(f"expected JSON objects, got {kind(first)}", file=str(path), index=0)
    keys = set(first)
    if "__problems__" in keys or "conversations" in keys:
        return "scienceqa_json"
    if {"gt_answer", "visual_input"} <= keys:
        return "hallusionbench_json"
    if {"question_id", "text", "label"} <= keys:
        return "pope"
    if {"question_id", "text"} <= keys:
        return "llava_jsonl"
    raise DataError(f"cannot tell the layout from the keys of the first record {sorted(keys)}; "
                    f"pass a layout (one of {', '.join(LAYOUTS)})", file=str(path), index=0)


def read_benchmark(path, *, layout: str = "auto", answers: str | None = None,
                   image_root: str | None = None) -> Benchmark:
    """Read a benchmark in ``layout`` (``"auto"``: :func:`detect_layout`). ``answers``: the
    annotation file(s) of a layout whose questions come without labels (llava_jsonl + POPE);
    ``image_root``: the folder image paths are relative to (default: the file's folder)."""
    path = str(path)
    if layout == "auto":
        layout = detect_layout(path)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r} (expected auto or one of "
                        f"{', '.join(LAYOUTS)})", file=path)
    if not os.path.exists(path):
        raise DataError("no such file or directory", file=path)
    if answers is not None and layout != "llava_jsonl":
        raise DataError(f"the {layout} layout carries its own answers; --answers is for "
                        "llava_jsonl question files", file=answers)
    if layout == "vlmevalkit_tsv":
        items, root = read_vlmevalkit_tsv(path, image_root)
    elif layout == "hf":
        items, root = read_hf(path, image_root)
    elif layout == "llava_jsonl":
        items, root = read_llava_jsonl(path, answers, image_root)
    elif layout == "pope":
        items, root = read_pope(path, image_root)
    elif layout == "mme_dir":
        items, root = read_mme_dir(path, image_root)
    elif layout == "scienceqa_json":
        first = _first_record(path)
        reader = read_problems if "__problems__" in first else read_vla_json
        items, root = reader(path, image_root)
    else:
        items, root = read_hallusionbench(path, image_root)
    return Benchmark(items=finish(items, path), image_root=root, layout=layout)


VLA_SEP = " ||| "


def _vla_lines(path: str):
    """Vision-LLM-Alignment ``eval/predict.py`` output: ``id ||| image ||| prompt ||| answer |||
    label`` per line, newlines inside written as ``\\n``."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(l for l in f if l.strip()):
            parts = line.rstrip("\n").split(VLA_SEP)
            if len(parts) < 5:
                raise DataError(f"expected 'id ||| image ||| prompt ||| prediction ||| label', "
                                f"got {len(parts)} fields", file=path, index=i)
            yield i, parts[0].strip(), parts[-2].replace("\\n", "\n")


def _json_predictions(path: str):
    for i, obj, loc in json_objects(path):
        if "prediction" in obj and "id" in obj:
            key, field = obj["id"], "prediction"
        elif "question_id" in obj and "text" in obj:
            key, field = obj["question_id"], "text"
        else:
            raise loc.error(f"not a prediction record: expected id + prediction (vlmalign) or "
                            f"question_id + text (LLaVA answers), got keys {sorted(obj)[:10]}")
        if not isinstance(obj[field], str):
            raise loc.error(f"the answer must be a string, got {kind(obj[field])}", field)
        yield i, str(key), obj[field]


def read_predictions(path) -> dict[str, str]:
    """Item id -> the model's raw answer text, from vlmalign's predictions.jsonl (id,
    prediction), a LLaVA answer file (question_id, text), a VLMEvalKit result file (.xlsx,
    .tsv, .csv with index and prediction) or Vision-LLM-Alignment's prediction output
    (``id ||| image ||| prompt ||| prediction ||| label`` lines). Duplicate ids are an error."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataError("no such file", file=path)
    suffix = Path(path).suffix.lower()
    if suffix in (".xlsx", ".tsv", ".csv"):
        rows = tabular_predictions(path)
    elif suffix in (".json", ".jsonl"):
        rows = _json_predictions(path)
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.readline()
        if VLA_SEP not in head:
            raise DataError("cannot tell the predictions format: expected .jsonl/.json, .xlsx, "
                            ".tsv, .csv or Vision-LLM-Alignment's ' ||| ' lines", file=path)
        rows = _vla_lines(path)
    out: dict[str, str] = {}
    where: dict[str, int] = {}
    for i, key, text in rows:
        if key in out:
            raise DataError(f"duplicate id {key!r} (also record {where[key]})", file=path,
                            index=i, field="id")
        out[key], where[key] = text, i
    if not out:
        raise DataError("no predictions in the file", file=path)
    return out
