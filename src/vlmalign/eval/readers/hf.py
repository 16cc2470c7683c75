"""Hugging Face copies of the benchmarks (lmms-lab and the authors' datasets): parquet files or
``datasets.save_to_disk`` directories, recognised by their columns."""

from __future__ import annotations

import ast
import re
from collections import Counter

from ...data.readers._common import Ctx, image_ref
from ...data.readers._containers import iter_raw
from ...errors import DataError
from ..items import EvalItem
from ._util import (POPE_SPLITS, Loc, blank, check_choice, default_root, kind, letters,
                    path_image, question_of, require, text_or_none, yes_no)

# name -> the columns that identify it (checked in this order)
KINDS = {
    "mmmu": ("id", "question", "options", "answer", "image_1"),
    "scienceqa": ("question", "choices", "answer"),
    "mmstar": ("index", "question", "answer", "l2_category", "image"),
    "mmbench": ("index", "question", "A", "B", "answer", "image"),
    "pope": ("question_id", "question", "answer", "image", "category", "image_source"),
    "mme": ("question_id", "question", "answer", "image", "category"),
}


def kind_of(columns: set[str], first: dict, src: str) -> str:
    for name, need in KINDS.items():
        if set(need) <= columns:
            if name == "mme" and str(first.get("category", "")).strip() in POPE_SPLITS:
                return "pope"  # a POPE copy without image_source
            return name
    known = "; ".join(f"{k}: {', '.join(v)}" for k, v in KINDS.items())
    raise DataError(f"unknown benchmark columns {sorted(columns)}; the hf layout needs the "
                    f"columns of one of {known}", file=src)


class _Images:
    """Image values of a row: bytes stay bytes; a bare path must exist under the root."""

    def __init__(self, root: str):
        self.root = root
        self.used_paths = False

    def __call__(self, value, loc: Loc, field: str):
        ref = image_ref(value, Ctx(loc.source, loc.index), field)
        if ref.path is not None:
            self.used_paths = True
            return path_image(ref.path, self.root, loc, field)
        return ref


def _mc_options_from_text(question: str, loc: Loc) -> tuple[str, dict[str, str] | None]:
    """MMStar keeps options in the question: '...\\nOptions: A: x, B: y, C: z, D: w'."""
    head, sep, tail = question.rpartition("Options:")
    if not sep:
        return question, None
    marks, pos = [], 0
    for letter in letters(26):  # the next letter's "X:" after the previous one, in order
        m = re.compile(rf"(?:^|[\s,]){letter}:").search(tail, pos)
        if m is None:
            break
        marks.append(m)
        pos = m.end()
    if not marks:
        raise loc.error("cannot read the options after 'Options:' (expected 'A: ..., B: ...')",
                        "question")
    opts = {}
    for j, m in enumerate(marks):
        end = marks[j + 1].start() if j + 1 < len(marks) else len(tail)
        opts[letters(26)[j]] = tail[m.end():end].strip().rstrip(",").strip()
    return head.rstrip(), opts


def read_hf(path: str, image_root: str | None) -> tuple[list[EvalItem], str | None]:
    src = str(path)
    root = default_root(path, image_root)
    images = _Images(root)
    rows = list(iter_raw(path))
    if not rows:
        raise DataError("no items: the dataset holds no rows", file=src)
    first = rows[0][1]
    if isinstance(first, DataError):
        raise first
    name = kind_of(set(first), first, src)
    seen_qid: Counter = Counter()
    items = []
    for i, row in rows:
        if isinstance(row, DataError):
            raise row
        loc = Loc(src, i)
        q = question_of(require(row, "question", loc), loc, "question")
        item = EvalItem(id="", question=q, source=src, index=i)
        if name in ("mmbench", "mmstar"):
            item.id = str(require(row, "index", loc))
            item.images = [images(require(row, "image", loc), loc, "image")]
            if name == "mmbench":
                item.options = {c: str(row[c]) for c in letters(26) if not blank(row.get(c))}
                item.hint = text_or_none(row.get("hint"))
                l2 = row.get("l2-category")
            else:
                item.question, item.options = _mc_options_from_text(q, loc)
                l2 = row.get("l2_category")
                item.meta["question_with_options"] = q
            answer = text_or_none(row.get("answer"))
            item.answer = (check_choice(answer, item.options, loc, "answer") if item.options
                           else answer)
            item.category = text_or_none(row.get("category"))
            if not blank(l2):
                item.meta["l2-category"] = l2
            try:
                item.group = str(int(item.id) % 1_000_000)
            except ValueError:
                item.group = item.id
            for k in ("split", "source", "comment", "meta_info"):
                if not blank(row.get(k)):
                    item.meta[k] = row[k]
        elif name == "scienceqa":
            choices = require(row, "choices", loc)
            if not isinstance(choices, list) or not choices:
                raise loc.error(f"choices must be a non-empty list, got {kind(choices)}",
                                "choices")
            item.id = str(row.get("id", i)) if not blank(row.get("id")) else str(i)
            item.options = dict(zip(letters(len(choices)), map(str, choices)))
            ans = require(row, "answer", loc)
            if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
                raise loc.error(f"answer must be the index of a choice (0 to {len(choices) - 1})"
                                f", got {ans!r}", "answer")
            item.answer = letters(len(choices))[ans]
            item.hint = text_or_none(row.get("hint"))
            item.images = [] if blank(row.get("image")) else [images(row["image"], loc, "image")]
            item.category = text_or_none(row.get("subject"))
            for k in ("grade", "topic", "task", "category", "skill", "lecture", "solution"):
                if not blank(row.get(k)):
                    item.meta[k] = row[k]
        elif name == "mmmu":
            item.id = str(require(row, "id", loc))
            raw = require(row, "options", loc)
            try:
                opts = ast.literal_eval(raw) if isinstance(raw, str) else raw
            except (ValueError, SyntaxError):
                raise loc.error(f"options must be a list written as text, got {raw!r}",
                                "options") from None
            if not isinstance(opts, list):
                raise loc.error(f"options must be a list, got {kind(opts)}", "options")
            answer = text_or_none(row.get("answer"))
            qtype = str(row.get("question_type") or ("multiple-choice" if opts else "open"))
            if qtype == "multiple-choice":
                item.options = dict(zip(letters(len(opts)), map(str, opts)))
                item.answer = check_choice(answer, item.options, loc, "answer")
            else:
                item.answer = answer
            item.images = [images(row[f"image_{k}"], loc, f"image_{k}") for k in range(1, 8)
                           if not blank(row.get(f"image_{k}"))]
            item.category = text_or_none(row.get("subfield"))
            item.meta["question_type"] = qtype
            for k in ("explanation", "img_type", "topic_difficulty"):
                if not blank(row.get(k)):
                    item.meta[k] = row[k]
        else:  # pope, mme
            qid = str(require(row, "question_id", loc))
            item.images = [images(require(row, "image", loc), loc, "image")]
            item.answer = yes_no(require(row, "answer", loc), loc, "answer")
            cat = text_or_none(row.get("category"))
            if name == "pope":
                if cat not in POPE_SPLITS:
                    raise loc.error(f"POPE category must be one of {list(POPE_SPLITS)}, got "
                                    f"{cat!r}", "category")
                item.split = cat
                # lmms-lab/POPE numbers questions per split: its own 'id' column is unique
                item.id = str(row["id"]) if not blank(row.get("id")) else f"{cat}/{qid}"
                item.meta["question_id"] = qid
                if not blank(row.get("image_source")):
                    item.meta["image_source"] = row["image_source"]
            else:
                # lmms-lab/MME's question_id is the image ("artwork/10002.jpg"), two questions each
                seen_qid[qid] += 1
                item.id = f"{qid}#{seen_qid[qid]}"
                item.group = qid
                item.category = cat
        items.append(item)
    return items, (root if images.used_paths else None)
