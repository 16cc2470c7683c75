"""MME scoring (Fu et al., 2023, "MME: A Comprehensive Evaluation Benchmark for Multimodal LLMs").

Follows the official tool ``eval_tool/calculation.py`` (BradyFU/Awesome-Multimodal-Large-Language-
Models, Evaluation branch; the same file is vendored e.g. in zjunlp/Deco ``eval_tool/calculation.py``):

* answer parsing: the prediction is lower-cased; exactly ``"yes"``/``"no"`` is taken as is,
  otherwise only its first 4 characters are looked at: ``"yes"`` in them -> yes, else ``"no"`` in
  them -> no, else ``"other"`` (always wrong). So "Not sure" -> no and " yes" -> yes; leading
  whitespace counts towards the 4 characters (the tool does not strip).
* per subtask: ``acc`` = correct questions / questions; ``acc_plus`` = images whose two questions
  are both right / images; ``score = 100 * acc + 100 * acc_plus`` (max 200).
* perception total = sum of the 10 perception subtask scores (max 2000); cognition = sum of the 4
  cognition subtask scores (max 800). Totals here sum the subtasks present in the input; the
  ``perception_subtasks`` / ``cognition_subtasks`` counts say how many that was (10 / 4 = full).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

from ._common import field

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(prediction: str) -> str:
    """'yes' / 'no' / 'other' by the official tool's rule (see module docstring)."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: Sequence[Mapping]) -> dict[str, float]:
    """MME scores from records ``{"subtask", "image", "label", "prediction"}``.

    ``subtask`` must be one of the 14 official subtask names; ``label`` is "yes"/"no" (any case);
    each (subtask, image) must have exactly two questions, as the official tool asserts.
    Returns ``<subtask>/acc``, ``<subtask>/acc_plus`` (fractions), ``<subtask>/score``
    (100*acc + 100*acc_plus), ``<subtask>/n`` (questions), ``<subtask>/images``,
    ``<subtask>/other`` (unparsable answers), plus ``perception``, ``cognition``, ``total``,
    ``perception_subtasks``, ``cognition_subtasks``, ``n`` and ``other``.
    """
    known = set(PERCEPTION) | set(COGNITION)
    per_image: dict[str, dict[str, list[tuple[int, bool]]]] = defaultdict(lambda: defaultdict(list))
    other: dict[str, int] = defaultdict(int)
    for i, rec in enumerate(records):
        task = field(rec, i, "subtask")
        if task not in known:
            raise ValueError(f"item {i}: field 'subtask' is {task!r}, not an MME subtask")
        image = field(rec, i, "image")
        label = str(field(rec, i, "label")).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"item {i}: field 'label' must be yes/no, got {label!r}")
        pred = field(rec, i, "prediction")
        if not isinstance(pred, str):
            raise ValueError(f"item {i}: field 'prediction' must be a string")
        parsed = parse_mme_answer(pred)
        other[task] += parsed == "other"
        per_image[task][image].append((i, parsed == label))

    out: dict[str, float] = {}
    for task, images in per_image.items():
        for image, answers in images.items():
            if len(answers) != 2:
                raise ValueError(f"item {answers[0][0]}: field 'image' {image!r} of subtask {task!r} "
                                 f"has {len(answers)} questions; MME pairs exactly 2 per image")
        n = 2 * len(images)
        acc = sum(ok for answers in images.values() for _, ok in answers) / n
        acc_plus = sum(all(ok for _, ok in answers) for answers in images.values()) / len(images)
        out.update({f"{task}/acc": acc, f"{task}/acc_plus": acc_plus,
                    f"{task}/score": 100 * acc + 100 * acc_plus, f"{task}/n": n,
                    f"{task}/images": len(images), f"{task}/other": other[task]})
    perc = [t for t in PERCEPTION if t in per_image]
    cog = [t for t in COGNITION if t in per_image]
    out["perception"] = sum(out[f"{t}/score"] for t in perc)
    out["cognition"] = sum(out[f"{t}/score"] for t in cog)
    out["total"] = out["perception"] + out["cognition"]
    out["perception_subtasks"] = len(perc)
    out["cognition_subtasks"] = len(cog)
    out["n"] = sum(out[f"{t}/n"] for t in per_image)
    out["other"] = sum(other.values())
    return out
