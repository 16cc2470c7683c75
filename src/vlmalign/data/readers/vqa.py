"""VQA files: image, question and (optionally) the reference answer.

One record::

    {"image": "a.jpg", "question": "What animal is shown?", "answer": "cat",
     "question_type": "what", "category": "animals"}

* ``question`` may be called ``text`` (LLaVA evaluation question files), used only when there
  is no ``question``. ``answer`` may be given as ``answers`` (VQAv2: a list of strings or of
  ``{"answer": ...}``); the reference is then the single most frequent answer, and a tie
  is an error (ambiguous). The full list stays in ``meta["answers"]``.
* ``id`` or ``question_id`` becomes the record id; every other field goes to ``record.meta``
  (question_type, label, category, ...) so evaluation can group by it.
* Read as :class:`RLPrompt` (reference = answer) by default, or as a :class:`Conversation`
  (question, then the answer as assistant turn) with ``kind="conversation"``.
* ``<image>`` placeholders in the question work as in LLaVA; none puts the image first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from ..placeholders import place_images, split_text
from ..schema import Record, RLPrompt
from ._common import Ctx, id_of, image_list, meta_of, text_of, type_name

KNOWN = {"id", "image", "images", "question", "answer"}


def matches(obj: Mapping) -> bool:
    if any(k in obj for k in ("conversations", "messages", "chosen", "rejected", "prompt")):
        return False
    return "question" in obj or ("text" in obj and ("image" in obj or "question_id" in obj))


def _reference(obj: Mapping, ctx: Ctx) -> tuple[str | None, set[str]]:
    if obj.get("answer") is not None:
        a = obj["answer"]
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        return text_of(a, ctx, "answer"), {"answer"}
    answers = obj.get("answers")
    if answers is None:
        return None, set()
    if isinstance(answers, str):
        return answers, {"answers"}
    if not isinstance(answers, list) or not answers:
        raise ctx.error(f"expected a non-empty list of answers, got {type_name(answers)}", "answers")
    texts = []
    for i, a in enumerate(answers):
        if isinstance(a, Mapping):
            a = a.get("answer")
        texts.append(text_of(a, ctx, f"answers[{i}]"))
    counts = Counter(texts).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        raise ctx.error(f"answers have no single most frequent answer "
                        f"({counts[0][0]!r} and {counts[1][0]!r}); give 'answer'", "answers")
    return counts[0][0], set()  # the list itself stays in meta


def parse(obj: Mapping, ctx: Ctx) -> Record:
    qk = "question" if "question" in obj else "text"
    if qk not in obj:
        raise ctx.error("missing field", "question")
    question = text_of(obj[qk], ctx, qk)
    images, image_key = image_list(obj, ctx)
    prompt = place_images([("user", split_text(question))], images,
                          lambda r: ctx.error(r, image_key))
    if not prompt[0].content:
        raise ctx.error("empty question and no image", qk)
    reference, used = _reference(obj, ctx)
    rid = id_of(obj, "id", "question_id")
    known = KNOWN | used | {qk} | ({"question_id"} if "id" not in obj else set())
    meta = meta_of(obj, known)
    if "answers" in meta and isinstance(meta["answers"], list):
        meta["answers"] = [a.get("answer") if isinstance(a, Mapping) else a
                           for a in meta["answers"]]
    return RLPrompt(prompt, reference, id=rid, meta=meta)
