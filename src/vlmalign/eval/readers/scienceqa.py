"""ScienceQA (Lu et al., 2022): Vision-LLM-Alignment's test / prediction JSON and the original
``problems.json``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...errors import DataError
from ..items import EvalItem
from ._util import (Loc, blank, check_choice, default_root, json_objects, kind, letters,
                    path_image, question_of, require, text_or_none)

# Vision-LLM-Alignment's human turn:
#   "{question}\nOptions: \n(A) x \n(B) y \nHint: {hint}\n\nOption:  "   (Hint only if any)
OPTION_LINE = re.compile(r"^\(([A-Z])\) ?(.*?)\s*$")
TAIL = re.compile(r"\n\nOption:\s*$")


def parse_vla_prompt(value: str, loc: Loc, field: str) -> tuple[str, dict[str, str], str | None]:
    text = re.sub(r"^(\s*<image>\s*)+", "", value)
    question, sep, rest = text.partition("\nOptions:")
    if not sep:
        raise loc.error("no 'Options:' block in the question (expected Vision-LLM-Alignment's "
                        "'QUESTION\\nOptions: \\n(A) ...' prompt)", field)
    rest = TAIL.sub("", rest)
    body, hsep, hint = rest.partition("\nHint: ")
    options = {}
    for line in body.split("\n"):
        if not line.strip():
            continue
        m = OPTION_LINE.match(line.strip())
        if m is None or m[1] != letters(len(options) + 1)[-1]:
            raise loc.error(f"cannot read option line {line!r} (expected '(A) text', letters "
                            "in order)", field)
        options[m[1]] = m[2]
    if not options:
        raise loc.error("no options after 'Options:'", field)
    return question_of(question, loc, field), options, (hint.strip() or None) if hsep else None


def read_vla_json(path: str, image_root: str | None) -> tuple[list[EvalItem], str]:
    src, root = str(path), default_root(path, image_root)
    items = []
    for i, obj, loc in json_objects(path):
        conv = require(obj, "conversations", loc)
        if not isinstance(conv, list) or not conv or not isinstance(conv[0], dict):
            raise loc.error(f"conversations must be a list of turns, got {kind(conv)}",
                            "conversations")
        prompt = conv[0].get("value")
        if not isinstance(prompt, str):
            raise loc.error(f"expected a string, got {kind(prompt)}", "conversations[0].value")
        question, options, hint = parse_vla_prompt(prompt, loc, "conversations[0].value")
        gpt = conv[1].get("value") if len(conv) > 1 and isinstance(conv[1], dict) else None
        label = obj.get("label")
        field = "label"
        if blank(label):
            label, field = text_or_none(gpt), "conversations[1].value"
        items.append(EvalItem(
            id=str(require(obj, "id", loc)), question=question,
            images=[] if blank(obj.get("image")) else [path_image(obj["image"], root, loc,
                                                                  "image")],
            answer=check_choice(label, options, loc, field), options=options, hint=hint,
            meta={"prompt": prompt}, source=src, index=i))
    return items, root


def is_problems(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(v, dict) and "choices" in v for v in list(obj.values())[:5]))


def read_problems(path: str, image_root: str | None) -> tuple[list[EvalItem], str]:
    """``problems.json``: pid -> {question, choices, answer (index), hint, image, split,
    subject, grade, ...}; images at ``SPLIT/PID/IMAGE`` under the image root (default: the
    ``images`` folder beside problems.json, as the ScienceQA repository lays it out)."""
    src = str(path)
    if image_root is None and (Path(path).parent / "images").is_dir():
        image_root = str(Path(path).parent / "images")
    root = default_root(path, image_root)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"invalid JSON ({e})", file=src) from None
    items = []
    for i, (pid, p) in enumerate(data.items()):
        loc = Loc(src, i)
        choices = require(p, "choices", loc)
        if not isinstance(choices, list) or not choices:
            raise loc.error(f"choices must be a non-empty list, got {kind(choices)}", "choices")
        options = dict(zip(letters(len(choices)), map(str, choices)))
        ans = require(p, "answer", loc)
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
            raise loc.error(f"answer must be the index of a choice (0 to {len(choices) - 1}), "
                            f"got {ans!r}", "answer")
        split = text_or_none(p.get("split"))
        images = []
        if not blank(p.get("image")):
            if split is None:
                raise loc.error("an image but no split: cannot tell its folder", "split")
            images = [path_image(f"{split}/{pid}/{p['image']}", root, loc, "image")]
        items.append(EvalItem(
            id=str(pid), question=question_of(require(p, "question", loc), loc, "question"),
            images=images, answer=letters(len(choices))[ans], options=options,
            category=text_or_none(p.get("subject")), split=split,
            hint=text_or_none(p.get("hint")),
            meta={k: p[k] for k in ("grade", "topic", "task", "category", "skill", "lecture",
                                    "solution") if not blank(p.get(k))},
            source=src, index=i))
    return items, root
