"""LLaVA's evaluation question files (``llava/eval/``, ``scripts/v1_5/eval/``) and POPE's own
annotation files (AoiDragon/POPE ``output/coco/coco_pope_{random,popular,adversarial}.json``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ...errors import DataError
from ..items import EvalItem
from ._util import (POPE_SPLITS, Loc, blank, check_choice, default_root, iter_records,
                    kind, path_image, question_of, require, text_or_none, yes_no)

POPE_NAME = re.compile(r"_pope_(random|popular|adversarial)\.jsonl?$")


def _records(path: str):
    for i, obj in iter_records(path):
        if isinstance(obj, DataError):
            raise obj
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {kind(obj)}", file=str(path), index=i)
        yield i, obj


def _image(obj: dict, root: str, loc: Loc):
    value = obj.get("image")
    return [] if blank(value) else [path_image(value, root, loc, "image")]


def _split_of(value, loc: Loc, field: str) -> str:
    if value not in POPE_SPLITS:
        raise loc.error(f"POPE split must be one of {list(POPE_SPLITS)}, got {value!r}", field)
    return value


def read_pope(path: str, image_root: str | None) -> tuple[list[EvalItem], str]:
    """One POPE file: ``question_id, image, text, label`` per line; the split from the file name
    (``coco_pope_random.json``) or a ``category`` field. A folder: every
    ``*_pope_{split}.json`` in it, pooled (ids become ``split/question_id``: POPE numbers each
    split's questions from 1); images are relative to the folder unless a root is given."""
    if os.path.isdir(path):
        items = []
        for f in _pope_files(path):
            got, root = read_pope(f, image_root or str(path))
            for it in got:
                it.id = f"{it.split}/{it.id}"
            items += got
        return items, root
    src, root = str(path), default_root(path, image_root)
    m = POPE_NAME.search(Path(path).name)
    items = []
    for i, obj in _records(path):
        loc = Loc(src, i)
        if m:
            split = m[1]
        elif "category" in obj:
            split = _split_of(obj["category"], loc, "category")
        else:
            raise loc.error("no split: name the file *_pope_{random,popular,adversarial}.json "
                            "or give each line a category", "category")
        items.append(EvalItem(
            id=str(require(obj, "question_id", loc)),
            question=question_of(require(obj, "text", loc), loc, "text"),
            images=_image(obj, root, loc), answer=yes_no(require(obj, "label", loc), loc, "label"),
            split=split, group=None if blank(obj.get("image")) else str(obj["image"]),
            source=src, index=i))
    return items, root


def _answer_field(value, loc: Loc, field: str):
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise loc.error(f"expected a string or a non-empty list of strings, got {kind(value)}", field)


def _options(value, loc: Loc) -> dict[str, str]:
    if isinstance(value, list):
        value = {chr(ord("A") + j): v for j, v in enumerate(value)}
    if not isinstance(value, dict) or not value or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise loc.error(f"options must be a list of strings or an object letter -> text, got "
                        f"{kind(value)}", "options")
    return dict(value)


def read_llava_jsonl(path: str, answers: str | None,
                     image_root: str | None) -> tuple[list[EvalItem], str]:
    """A LLaVA question file (``question_id, image, text, category``); our extension fields
    ``answer``, ``options``, ``objects``, ``captions``; labels from POPE files via ``answers``."""
    src, root = str(path), default_root(path, image_root)
    items = []
    for i, obj in _records(path):
        loc = Loc(src, i)
        item = EvalItem(id=str(require(obj, "question_id", loc)),
                        question=question_of(require(obj, "text", loc), loc, "text"),
                        images=_image(obj, root, loc), source=src, index=i)
        cat = text_or_none(obj.get("category"))
        if cat in POPE_SPLITS:
            item.split = cat  # llava_pope_test.jsonl: the category is POPE's split
        else:
            item.category = cat
        if not blank(obj.get("image")):
            item.group = str(obj["image"])
        if "options" in obj:
            item.options = _options(obj["options"], loc)
        if "answer" in obj and "captions" in obj:
            raise loc.error("both 'answer' and 'captions' are given; use one", "captions")
        for key in ("answer", "captions"):
            if key in obj:
                item.answer = _answer_field(obj[key], loc, key)
        if item.options:
            if isinstance(item.answer, list):
                raise loc.error("a multiple-choice answer must be one letter", "answer")
            item.answer = check_choice(item.answer, item.options, loc, "answer")
        if "objects" in obj:
            objs = obj["objects"]
            if not isinstance(objs, list) or not all(isinstance(o, str) for o in objs):
                raise loc.error(f"objects must be a list of strings, got {kind(objs)}", "objects")
            item.meta["objects"] = list(objs)
        for k, v in obj.items():
            if k not in {"question_id", "text", "image", "category", "options", "answer",
                         "captions", "objects"} and v is not None:
                item.meta[k] = v
        items.append(item)
    if answers is not None:
        _attach_pope_labels(items, answers)
    return items, root


def _pope_files(answers: str) -> list[str]:
    if os.path.isdir(answers):
        files = sorted(str(p) for p in Path(answers).iterdir() if POPE_NAME.search(p.name))
        if not files:
            raise DataError("no POPE annotation files (*_pope_{random,popular,adversarial}.json)"
                            " in this folder", file=answers)
        return files
    if not os.path.exists(answers):
        raise DataError("no such file or directory", file=answers)
    return [answers]


def _attach_pope_labels(items: list[EvalItem], answers: str) -> None:
    """Labels from POPE files, matched as LLaVA's ``eval_pope.py`` does: the questions of a
    split, in file order, against that split's annotation lines, in file order. Each pair must
    ask the same question about the same image."""
    files = _pope_files(answers)
    for file in files:
        labels = [(i, obj) for i, obj in _records(file)]
        m = POPE_NAME.search(Path(file).name)
        split = m[1] if m else None
        if split is None:
            splits = {_split_of(obj.get("category"), Loc(file, i), "category")
                      for i, obj in labels}
            if len(splits) != 1:
                raise DataError(f"an annotation file must hold one POPE split, found "
                                f"{sorted(splits)}", file=file)
            split = splits.pop()
        todo = [it for it in items if it.split == split or (it.split is None and len(files) == 1)]
        if len(todo) != len(labels):
            raise DataError(f"{len(labels)} annotation lines for split {split!r} but "
                            f"{len(todo)} questions of that split in {items[0].source}", file=file)
        for it, (i, obj) in zip(todo, labels):
            loc = Loc(file, i)
            text = question_of(require(obj, "text", loc), loc, "text")
            if text.strip() != it.question.strip() or obj.get("image") != it.group:
                raise loc.error(f"does not match {it.where()}: annotation asks {text!r} about "
                                f"{obj.get('image')!r}, the question file asks {it.question!r} "
                                f"about {it.group!r}", "text")
            it.answer = yes_no(require(obj, "label", loc), loc, "label")
            it.split = split
            it.meta["label_source"] = f"{file}: record {i}"
    for it in items:
        if it.answer is None:
            raise DataError(f"no annotation for this question (split {it.split!r}) in "
                            f"{answers}", file=it.source, index=it.index, field="question_id")
