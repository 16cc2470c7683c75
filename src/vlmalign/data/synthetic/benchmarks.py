"""ShapesWorld's held-out split written in public benchmark layouts, so that a model is measured
on it by the same readers and tasks as on the real benchmarks (``vlmalign eval``).

:func:`write_benchmarks` reads an already generated ShapesWorld directory (``manifest.json``,
``scenes.json``, ``vqa_eval.json``, ``captions_eval.json`` and the eval images; nothing of the
train split) and writes, under ``out_dir`` (default ``data_dir/benchmarks``):

=================================  ===================  =================================================
file                               layout               content
=================================  ===================  =================================================
shapesworld_pope_random.json       POPE (AoiDragon/     JSON lines ``{"question_id", "image",
shapesworld_pope_popular.json      POPE ``output/coco/  "image_id", "text", "label"}``, keys in that
shapesworld_pope_adversarial.json  coco_pope_*.json``)  order; ``text`` "Is there a red circle in the
                                                        image?", ``label`` "yes"/"no"
shapesworld_mmbench.tsv            VLMEvalKit MMBench   columns :data:`MCQ_COLUMNS`; ``image`` is the
                                   TSV                  base64 of the PNG file's bytes
shapesworld_caption.jsonl          LLaVA eval question  ``{"question_id", "image", "text", "captions",
                                   JSONL + CHAIR        "objects"}``
shapesworld_chair_vocab.json       -                    ``{"vocabulary", "synonyms", ...}`` for
                                                        ``vlmalign.eval.chair.extract_objects``
shapesworld_vqa.jsonl              LLaVA eval question  ``{"question_id", "image", "text", "category",
                                   JSONL + answer       "answer"}``
=================================  ===================  =================================================

Image paths are relative to ``data_dir`` (``images/eval_00012.png``): pass ``data_dir`` as the
image root. Texts carry no image placeholder (the eval task places the image). Everything is a
function of the ShapesWorld directory: the same directory gives the same bytes.

**Objects.** ShapesWorld's object categories are its colour-shape combinations ("red circle"):
they play the part of COCO's 80 categories in POPE and in CHAIR. An image holds each combination
at most once (the generator draws distinct combinations), as a COCO image either has a category
or not, so "absent" is exact; a bare shape ("circle") or colour is not an object (with 3 shapes
and up to 3 objects an absent shape would often not exist). The vocabulary is every combination
of the config's colours and shapes, in config order (colour-major).

**POPE** (Li et al., EMNLP 2023, "Evaluating Object Hallucination in Large Vision-Language
Models"). ShapesWorld's own ``pope_eval.json`` has only "random" and a different "adversarial"
(an absent combination sharing a colour or shape with the image), so the three splits are built
here from the scene object lists the way POPE builds them. Per image, ``k = min(3, objects,
absent combinations)`` of its objects are the positives (POPE's 3 per image; a seeded sample,
kept in reading order, the same in all three splits), and for the j-th positive one negative
is drawn, never an object of the image nor an earlier negative of it:

* random: uniform over the objects that occur in the held-out images (POPE's ground-truth
  object list);
* popular: the most frequent such object (frequency = held-out images containing it);
* adversarial: the object that co-occurs most often with the j-th positive (images holding
  both);

ties go to the earlier vocabulary entry; when the ranking has no candidate left, the negative is
drawn as in random (POPE's fallback), then from the whole vocabulary. Per image the file holds
the k "yes" questions, then the k "no" ones (the j-th "no" is the j-th positive's negative), as
in POPE's published files; ``question_id`` counts from 0 over the file, ``image_id`` is the eval
image's number. So every split is exactly balanced. :func:`pope_questions` is the construction
on plain object lists.

**MMBench.** One row per ``vqa_eval.json`` record (every question type once per eval image),
``index`` 0, 1, ... (all below 1e6: these are the original questions; CircularEval's rotations
``index + k * 1e6`` are the eval task's job). Options are drawn from the question type's answer
vocabulary (:func:`answer_vocabulary`): ``min(4, size)`` options, the reference among them at a
seeded position, the others a seeded sample; unused option columns are empty (as in MMBench
rows with fewer options), so yes/no existence questions have A and B only. ``answer`` is the
letter, ``category`` the ShapesWorld question type, ``l2-category``
"finegrained_perception (instance-level)" (every question is about single objects: MMBench's
attribute recognition and object localization), ``split`` "dev", ``hint`` empty.

**Captions / CHAIR.** One line per eval image: ``text`` the image's caption prompt from
``captions_eval.json``, ``captions`` its reference caption, ``objects`` its colour-shape names.
``shapesworld_chair_vocab.json`` holds the vocabulary and synonyms ("red rhombus" -> "red
diamond", "red plus" -> "red cross"); a mention is a colour followed by a shape word (its plural
too), so a wrong colour, a wrong shape and an extra object each make a hallucinated mention, and
a shape named without its colour is not counted.

**VQA.** One line per ``vqa_eval.json`` record: ``text`` the question, ``answer`` the exact
ShapesWorld reference, ``category`` the question type.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import ShapesConfig
from .generate import FILES, _rng, _write, read_manifest
from .scene import Scene
from .tasks import article

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
POPE_SAMPLE_NUM = 3  # positives per image, as in POPE
MCQ_COLUMNS: tuple[str, ...] = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                                "l2-category", "split", "image")
MCQ_LETTERS = "ABCD"
MCQ_L2_CATEGORY = "finegrained_perception (instance-level)"
MCQ_SPLIT = "dev"

BENCHMARK_FILES: dict[str, str] = {
    **{f"pope_{s}": f"shapesworld_pope_{s}.json" for s in POPE_SPLITS},
    "mmbench": "shapesworld_mmbench.tsv",
    "caption": "shapesworld_caption.jsonl",
    "chair_vocab": "shapesworld_chair_vocab.json",
    "vqa": "shapesworld_vqa.jsonl",
}

# Streams: [seed, _BENCH, purpose, item]; generate.py's streams have a split id (1, 2) where
# _BENCH stands, so none of these coincides with one of the generator's.
_BENCH = 3
_POSITIVES, _MCQ = 0, 1
_POPE_STREAM = {"random": 2, "popular": 3, "adversarial": 4}


def object_vocabulary(config: ShapesConfig) -> list[str]:
    """Every colour-shape combination of ``config``, colour-major: ``["red circle", ...]``."""
    return [f"{c} {s}" for c in config.colours for s in config.shapes]


def chair_synonyms(config: ShapesConfig) -> dict[str, str]:
    """Other names of ShapesWorld's shapes, per colour (the references never use them)."""
    other = {"diamond": ("rhombus",), "cross": ("plus",)}
    return {f"{c} {alt}": f"{c} {s}" for c in config.colours for s in config.shapes
            for alt in other.get(s, ())}


def answer_vocabulary(config: ShapesConfig) -> dict[str, tuple[str, ...]]:
    """Per question type, the answers the multiple-choice options are drawn from."""
    return {"colour": tuple(config.colours), "shape": tuple(config.shapes),
            "position": tuple(config.cells),
            "count": tuple(str(n) for n in range(max(config.max_objects, 3) + 1)),
            "existence": ("yes", "no")}


def object_frequencies(object_lists: Sequence[Sequence[str]]) -> Counter:
    """Images containing each object."""
    return Counter(o for objs in object_lists for o in set(objs))


def co_occurrence(object_lists: Sequence[Sequence[str]]) -> dict[str, Counter]:
    """``co[a][b]``: images containing both ``a`` and ``b`` (``a != b``)."""
    co: dict[str, Counter] = {}
    for objs in object_lists:
        objs = set(objs)
        for a in objs:
            co.setdefault(a, Counter()).update(b for b in objs if b != a)
    return co


def _uniform(rng: np.random.Generator, cands: list[str]) -> str | None:
    return cands[int(rng.integers(len(cands)))] if cands else None


def pope_questions(object_lists: Sequence[Sequence[str]], vocabulary: Sequence[str], seed: int,
                   sample_num: int = POPE_SAMPLE_NUM) -> dict[str, list[list[tuple[str, str]]]]:
    """POPE's three splits on plain object lists (see the module docstring):
    ``{split: [[(object, "yes"), ..., (object, "no"), ...] per image]}``, per image the k
    positives then their k negatives, the j-th negative drawn for the j-th positive."""
    rank = {o: i for i, o in enumerate(vocabulary)}
    for i, objs in enumerate(object_lists):
        unknown = [o for o in objs if o not in rank]
        if unknown:
            raise ValueError(f"image {i}: objects {unknown} are not in the vocabulary")
        if len(set(objs)) != len(objs):
            raise ValueError(f"image {i}: an object is listed twice")
    freq = object_frequencies(object_lists)
    co = co_occurrence(object_lists)
    in_dataset = sorted(freq, key=rank.__getitem__)
    popular = sorted(freq, key=lambda o: (-freq[o], rank[o]))
    out: dict[str, list[list[tuple[str, str]]]] = {s: [] for s in POPE_SPLITS}
    for i, objs in enumerate(object_lists):
        present = set(objs)
        k = min(sample_num, len(objs), len(vocabulary) - len(present))
        picked = _rng(seed, _BENCH, _POSITIVES, i).choice(len(objs), size=k, replace=False)
        positives = [objs[j] for j in sorted(int(j) for j in picked)]
        for split in POPE_SPLITS:
            rng = _rng(seed, _BENCH, _POPE_STREAM[split], i)
            negatives: list[str] = []
            for pos in positives:
                taken = present | set(negatives)
                if split == "popular":
                    ranked = popular
                elif split == "adversarial":
                    ranked = sorted(co.get(pos, {}), key=lambda o: (-co[pos][o], rank[o]))
                else:
                    ranked = []
                neg = next((o for o in ranked if o not in taken), None)
                if neg is None:
                    neg = (_uniform(rng, [o for o in in_dataset if o not in taken])
                           or _uniform(rng, [o for o in vocabulary if o not in taken]))
                negatives.append(neg)
            out[split].append([(o, "yes") for o in positives] + [(o, "no") for o in negatives])
    return out


def pope_text(obj: str) -> str:
    """POPE's question: ``Is there a red circle in the image?``."""
    return f"Is there {article(obj)} {obj} in the image?"


def _strip_image(text: str, where: str) -> str:
    """A ShapesWorld prompt without its image placeholder (``image_position`` before/after)."""
    if text.startswith("<image>\n"):
        text = text[len("<image>\n"):]
    if text.endswith("\n<image>"):
        text = text[:-len("\n<image>")]
    if "<image>" in text:
        raise ValueError(f"{where}: unexpected image placeholder in {text!r}")
    return text


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def _eval_scenes(data_dir: Path) -> list[tuple[str, Scene]]:
    rows = json.loads((data_dir / FILES["scenes"][0]).read_text())
    return [(r["image"], Scene.from_json(r)) for r in rows if r["split"] == "eval"]


def _mcq_row(index: int, rec: dict, config: ShapesConfig, vocab: dict[str, tuple[str, ...]],
             data_dir: Path) -> list:
    qtype, answer = rec["question_type"], rec["answer"]
    values = vocab[qtype]
    if answer not in values:
        raise ValueError(f"vqa_eval.json record {index}: answer {answer!r} is not in the "
                         f"{qtype} vocabulary {list(values)}")
    rng = _rng(config.seed, _BENCH, _MCQ, index)
    k = min(len(MCQ_LETTERS), len(values))
    others = [v for v in values if v != answer]
    picked = [others[int(j)] for j in rng.choice(len(others), size=k - 1, replace=False)]
    at = int(rng.integers(k))
    options = picked[:at] + [answer] + picked[at:]
    image = base64.b64encode((data_dir / rec["image"]).read_bytes()).decode("ascii")
    return [index, _strip_image(rec["question"], f"vqa_eval.json record {index}"), "",
            *options, *[""] * (len(MCQ_LETTERS) - k), MCQ_LETTERS[at], qtype, MCQ_L2_CATEGORY,
            MCQ_SPLIT, image]


def _tsv(rows: list[list]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(MCQ_COLUMNS)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def write_benchmarks(data_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ShapesWorld's held-out split of ``data_dir`` in benchmark layouts (module
    docstring) under ``out_dir`` (default ``data_dir/benchmarks``); returns
    ``{name: path}`` for the names of :data:`BENCHMARK_FILES`."""
    data_dir = Path(data_dir)
    out = Path(out_dir) if out_dir is not None else data_dir / "benchmarks"
    config = ShapesConfig.from_dict(read_manifest(data_dir)["config"])
    scenes = _eval_scenes(data_dir)
    vqa = json.loads((data_dir / FILES["vqa_eval"][0]).read_text())
    captions = {r["image"]: r for r in json.loads((data_dir / FILES["captions_eval"][0]).read_text())}
    vocabulary = object_vocabulary(config)
    data: dict[str, bytes] = {}

    pope = pope_questions([[o.name for o in s.objects] for _, s in scenes], vocabulary, config.seed)
    for split in POPE_SPLITS:
        rows = []
        for i, (rel, _) in enumerate(scenes):
            for obj, label in pope[split][i]:
                rows.append({"question_id": len(rows), "image": rel, "image_id": i,
                             "text": pope_text(obj), "label": label})
        data[f"pope_{split}"] = _jsonl(rows)

    answers = answer_vocabulary(config)
    data["mmbench"] = _tsv([_mcq_row(i, r, config, answers, data_dir) for i, r in enumerate(vqa)])

    rows = []
    for i, (rel, scene) in enumerate(scenes):
        human, gpt = captions[rel]["conversations"]
        rows.append({"question_id": i, "image": rel,
                     "text": _strip_image(human["value"], f"captions_eval.json image {rel}"),
                     "captions": [gpt["value"]], "objects": [o.name for o in scene.objects]})
    data["caption"] = _jsonl(rows)
    data["chair_vocab"] = (json.dumps({
        "object": "a colour-shape combination, e.g. \"red circle\"; a bare shape or colour is "
                  "not an object",
        "vocabulary": vocabulary, "synonyms": chair_synonyms(config),
        "usage": "vlmalign.eval.chair.extract_objects(caption, vocabulary, synonyms); "
                 "ground truth: the objects field of shapesworld_caption.jsonl",
    }, indent=1, sort_keys=True) + "\n").encode("utf-8")

    data["vqa"] = _jsonl([{"question_id": i, "image": r["image"],
                           "text": _strip_image(r["question"], f"vqa_eval.json record {i}"),
                           "category": r["question_type"], "answer": r["answer"]}
                          for i, r in enumerate(vqa)])

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fname in BENCHMARK_FILES.items():
        _write(out / fname, data[name])
        paths[name] = out / fname
    return paths
