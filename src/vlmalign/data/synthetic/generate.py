"""Write a ShapesWorld dataset: images plus data files in the community formats vlmalign reads.

Layout of ``out_dir`` (image paths inside the files are relative to ``out_dir``, so pass
``--image-root out_dir``):

======================  ============  ==========================================================
file                    format        content
======================  ============  ==========================================================
images/train_NNNNN.png  PNG           train images (RGB, ``image_size`` square)
images/eval_NNNNN.png   PNG           held-out images, never pixel-identical to a train image
scenes.json             ground truth  ``[{"image", "split", "grid", "image_size", "background",
                                      "objects": [{"colour","shape","cell","bbox"}]}]``
captions_train.json     LLaVA         one caption conversation per train image
captions_eval.json      LLaVA         one per eval image
vqa_train.json          LLaVA         every question type once per train image, grouped in
                                      single- and multi-turn (up to ``max_turns``) records
vqa_eval.json           VQA           ``{"id","image","question","answer","question_type"}``
                                      every question type once per eval image (+ ``label``
                                      on existence questions)
pope_eval.json          VQA + POPE    existence questions, per eval image and category
                                      (random, adversarial) one "yes" and one "no": exactly
                                      balanced; ``label`` yes/no, ``category``, ``object``
dpo_{train,eval}.json   plain_dpo     ``{"id","image","prompt","chosen","rejected",
                                      "question_type","error"}``, per image one short-answer
                                      pair and one caption pair; rejected hallucinates
ranked_{train,eval}     LLaVA,        last gpt value is a list: correct caption, then captions
.json                   ranked        with 1, 2, ... errors (``num_errors`` lists them)
hallucination_{train,    plain_dpo     per image two description pairs, ``chosen`` the caption:
eval}.json                            ``rejected`` it with a hallucinated mention (a kind of
                                      ``hallucination_kinds``, in turn; ``error`` that kind),
                                      then it with one object left out (``error`` omission)
hallucination_qa_{train,  plain_dpo     the same pairs with two existence-question pairs between
eval}.json                            them: about the hallucinated object (``chosen`` "no") and
                                      about an object in the image (``chosen`` "yes")
sft_train.json          LLaVA         the SFT mix: vqa_train.json's records, and for a
                                      ``descriptions`` share of train images a description
                                      conversation, a ``hallucination`` share of them with a
                                      hallucinated mention (``hallucinated`` lists its kinds)
rl_{train,eval}.json    VQA           one question per image with its verifiable answer
kto_{train,eval}.jsonl  TRL (KTO)     ``{"id","prompt","completion","label","images":[path],
                                      "question_type"}``, per image one desirable and one
                                      undesirable (hallucinated) example
manifest.json           -             config, counts, files, reader formats and record kinds,
                                      sha256 of each file
======================  ============  ==========================================================

With ``image_position="before"`` (the default) prompts in plain_dpo, VQA and KTO files carry no
image placeholder (like the Resonance samples): the record's image goes before the text of the
first user turn, and LLaVA files put ``<image>\\n`` at the start of the first human turn. With
``image_position="after"`` every file spells the placeholder out after that text
(``What colour is the shape in the top left?\\n<image>``). ``manifest.json`` names, per file, the
``format`` to pass to :func:`vlmalign.data.readers.read_file` and the record kind it yields
(conversation, rl_prompt, preference, ranked, unpaired).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .config import ShapesConfig
from .scene import Scene, render, sample_scene
from .tasks import (CAPTION_ERROR_KINDS, QA, TEMPLATES, _pick, _template, article, ask, caption,
                    corrupted_captions, describe, wrong_answer)
from .verify import parse_caption

GENERATOR_VERSION = 1
SPLITS = ("train", "eval")

# name -> (file name, format name for vlmalign.data.readers, record kind it reads as)
FILES: dict[str, tuple[str, str, str | None]] = {
    "scenes": ("scenes.json", "shapesworld_scenes", None),
    "captions_train": ("captions_train.json", "llava", "conversation"),
    "captions_eval": ("captions_eval.json", "llava", "conversation"),
    "vqa_train": ("vqa_train.json", "llava", "conversation"),
    "vqa_eval": ("vqa_eval.json", "vqa", "rl_prompt"),
    "pope_eval": ("pope_eval.json", "vqa", "rl_prompt"),
    "dpo_train": ("dpo_train.json", "plain_dpo", "preference"),
    "dpo_eval": ("dpo_eval.json", "plain_dpo", "preference"),
    "ranked_train": ("ranked_train.json", "llava", "ranked"),
    "ranked_eval": ("ranked_eval.json", "llava", "ranked"),
    "sft_train": ("sft_train.json", "llava", "conversation"),
    "hallucination_train": ("hallucination_train.json", "plain_dpo", "preference"),
    "hallucination_eval": ("hallucination_eval.json", "plain_dpo", "preference"),
    "hallucination_qa_train": ("hallucination_qa_train.json", "plain_dpo", "preference"),
    "hallucination_qa_eval": ("hallucination_qa_eval.json", "plain_dpo", "preference"),
    "rl_train": ("rl_train.json", "vqa", "rl_prompt"),
    "rl_eval": ("rl_eval.json", "vqa", "rl_prompt"),
    "kto_train": ("kto_train.jsonl", "trl", "unpaired"),
    "kto_eval": ("kto_eval.jsonl", "trl", "unpaired"),
}

# Stream ids: each (split, image, purpose) gets its own generator, so changing one output
# (e.g. the question types) never changes the images or the other files.
_SPLIT_ID = {"train": 1, "eval": 2}
_SCENE, _CAPTION, _VQA, _POPE, _DPO, _RANKED, _RL, _KTO, _DESCRIBE, _HALLUCINATION, _HALLUCINATION_QA = range(11)
_MAX_ATTEMPTS = 1000


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _dump_json(obj: Any) -> bytes:
    """A JSON list is written one record per line (readable, diffable and fast: the C
    encoder); keys are sorted so output is byte-stable."""
    if isinstance(obj, list):
        body = ",\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in obj)
        return ("[\n" + body + "\n]\n").encode("utf-8")
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _dump_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _human(text: str, first: bool, config: ShapesConfig) -> dict:
    return {"from": "human", "value": _with_image(text, config, explicit=True) if first else text}


def _with_image(text: str, config: ShapesConfig, explicit: bool = False) -> str:
    """``text`` with the image placeholder where ``config.image_position`` puts it. Before the
    text, only LLaVA files (``explicit``) spell it out: the other formats' readers put an image
    without a placeholder first."""
    if config.image_position == "after":
        return text + "\n<image>"
    return "<image>\n" + text if explicit else text


def _gpt(value) -> dict:
    return {"from": "gpt", "value": value}


def make_scenes(config: ShapesConfig) -> dict[str, list[tuple[str, Scene, bytes]]]:
    """Sample and render every scene: ``{split: [(relative image path, scene, png bytes)]}``.

    Eval scenes whose pixels equal a train image are redrawn, so held-out images are never
    seen in training.
    """
    out: dict[str, list[tuple[str, Scene, bytes]]] = {s: [] for s in SPLITS}
    train_pixels: set[bytes] = set()
    for split in SPLITS:
        n = config.train_images if split == "train" else config.eval_images
        for i in range(n):
            for attempt in range(_MAX_ATTEMPTS):
                scene = sample_scene(_rng(config.seed, _SPLIT_ID[split], i, _SCENE, attempt), config)
                img = render(scene)
                digest = hashlib.sha256(img.tobytes()).digest()
                if split == "train":
                    train_pixels.add(digest)
                    break
                if digest not in train_pixels:
                    break
            else:
                raise ValueError("ShapesConfig admits too few distinct images for disjoint "
                                 "train and eval splits; use more colours, shapes or jitter")
            out[split].append((f"images/{split}_{i:05d}.png", scene, _png_bytes(img)))
    return out


def _existence_variant(k: int, alternate_no: int) -> str:
    """Balanced existence variants from a counter: yes, no, yes, no ... with the "no"
    questions alternating random / adversarial."""
    if k % 2 == 0:
        return "present"
    return ("random", "adversarial")[alternate_no % 2]


def _variant(qtype: str, k: int) -> str | None:
    return _existence_variant(k, k // 2) if qtype == "existence" else None


def _caption_prompt(rng: np.random.Generator, config: ShapesConfig) -> str:
    return _template("caption", rng, config)


def build_records(config: ShapesConfig, scenes: dict[str, list[tuple[str, Scene, bytes]]]
                  ) -> dict[str, list[dict]]:
    """Every data file's records (without writing anything)."""
    seed = config.seed
    qtypes = config.question_types
    nq = len(qtypes)
    files: dict[str, list[dict]] = {name: [] for name in FILES}
    hallucinated = 0   # hallucinated descriptions so far (the kinds are drawn in turn)
    for split in SPLITS:
        sid = _SPLIT_ID[split]
        for i, (rel, scene, _) in enumerate(scenes[split]):
            files["scenes"].append({"image": rel, "split": split, **scene.to_json()})

            # captions (LLaVA)
            rng = _rng(seed, sid, i, _CAPTION)
            files[f"captions_{split}"].append({
                "id": f"caption-{split}-{i:05d}", "image": rel,
                "conversations": [_human(_caption_prompt(rng, config), True, config), _gpt(caption(scene))]})

            # VQA: every type once per image; existence alternates yes/no across images
            rng = _rng(seed, sid, i, _VQA)
            qas = [ask(scene, t, rng, config, variant=_variant(t, i)) for t in qtypes]
            if split == "train":
                first = len(files["vqa_train"])
                order = rng.permutation(len(qas))
                qas_shuffled = [qas[int(j)] for j in order]
                k = 0
                while k < len(qas_shuffled):
                    turns = int(rng.integers(1, config.max_turns + 1))
                    chunk = qas_shuffled[k:k + turns]
                    conv = []
                    for j, qa in enumerate(chunk):
                        conv += [_human(qa.question, j == 0, config), _gpt(qa.answer)]
                    files["vqa_train"].append({"id": f"vqa-train-{i:05d}-{k}", "image": rel,
                                               "conversations": conv})
                    k += turns
                files["sft_train"] += files["vqa_train"][first:]
                rec = _description(i, rel, scene, config, hallucinated)
                if rec is not None:
                    files["sft_train"].append(rec)
                    hallucinated += bool(rec["hallucinated"])
            else:
                for qa in qas:
                    files["vqa_eval"].append(_vqa_record(f"vqa-eval-{i:05d}-{qa.question_type}",
                                                         rel, qa, config))

                # POPE: per category one yes and one no (skipped together when impossible)
                rng = _rng(seed, sid, i, _POPE)
                for cat in ("random", "adversarial"):
                    no = ask(scene, "existence", rng, config, variant=cat)
                    if no.meta["variant"] != cat:
                        continue
                    yes = ask(scene, "existence", rng, config, variant="present")
                    for qa in (yes, no):
                        rec = _vqa_record(f"pope-{i:05d}-{cat}-{qa.answer}", rel, qa, config)
                        rec.update(category=cat, object=qa.meta["object"])
                        files["pope_eval"].append(rec)

            # preference pairs (plain_dpo): one short answer, one caption per image
            rng = _rng(seed, sid, i, _DPO)
            t = qtypes[i % nq]
            qa = ask(scene, t, rng, config, variant=_variant(t, i // nq))
            files[f"dpo_{split}"].append({
                "id": f"dpo-{split}-{i:05d}-qa", "image": rel, "prompt": _with_image(qa.question, config),
                "chosen": qa.answer, "rejected": wrong_answer(scene, qa, rng, config),
                "question_type": t, "error": "wrong_" + t})
            kind = CAPTION_ERROR_KINDS[i % len(CAPTION_ERROR_KINDS)]
            (bad, applied), = corrupted_captions(scene, rng, config, [kind])
            files[f"dpo_{split}"].append({
                "id": f"dpo-{split}-{i:05d}-caption", "image": rel,
                "prompt": _with_image(_caption_prompt(rng, config), config), "chosen": caption(scene),
                "rejected": bad,
                "question_type": "caption", "error": applied[0]})

            # description pairs (plain_dpo): the faithful description against a hallucinated one,
            # and against one that leaves an object out (without these, every rejected description
            # would be the longer one, and preferring the shorter is a way to win)
            rng = _rng(seed, sid, i, _HALLUCINATION)
            kinds = config.pair_kinds or config.hallucination_kinds
            prompt = _with_image(_caption_prompt(rng, config), config)
            (bad, applied), = corrupted_captions(scene, rng, config, [kinds[i % len(kinds)]])
            left_out = int(rng.integers(len(scene.objects)))
            short = describe([(o.colour, o.shape, o.cell) for j, o in enumerate(scene.objects) if j != left_out],
                             scene.grid)
            pairs = [{"id": f"hallucination-{split}-{i:05d}-{what}", "image": rel, "prompt": prompt,
                      "chosen": caption(scene), "rejected": rejected, "question_type": "caption", "error": error}
                     for what, rejected, error in (("hallucinated", bad, applied[0]), ("omitted", short, "omission"))]
            files[f"hallucination_{split}"] += pairs
            # the same pairs with existence questions between them (hallucination_qa): about the
            # object the hallucinated description made up ("no" over "yes") and about one the
            # image holds ("yes" over "no"), so that preferring faithful descriptions does not
            # teach the model to answer "yes" to what it has not seen
            rng = _rng(seed, sid, i, _HALLUCINATION_QA)
            made_up = next((c, s) for c, s, _ in parse_caption(bad) if not scene.has(c, s))
            held = _pick(rng, scene.objects)
            questions = []
            for what, (colour, shape), answer in (("absent", made_up, "no"), ("present", (held.colour, held.shape), "yes")):
                q = _template("existence", rng, config).format(article=article(colour), colour=colour, shape=shape)
                questions.append({"id": f"hallucination-{split}-{i:05d}-question-{what}", "image": rel,
                                  "prompt": _with_image(q, config), "chosen": answer,
                                  "rejected": "no" if answer == "yes" else "yes",
                                  "question_type": "existence", "error": "wrong_existence"})
            files[f"hallucination_qa_{split}"] += [pairs[0], *questions, pairs[1]]

            # ranked lists (LLaVA ranked): correct caption, then 1, 2, ... errors
            rng = _rng(seed, sid, i, _RANKED)
            kinds = [CAPTION_ERROR_KINDS[(i + j) % len(CAPTION_ERROR_KINDS)]
                     for j in range(config.ranked_size - 1)]
            worse = corrupted_captions(scene, rng, config, kinds)
            files[f"ranked_{split}"].append({
                "id": f"ranked-{split}-{i:05d}", "image": rel,
                "num_errors": list(range(config.ranked_size)),
                "conversations": [_human(_caption_prompt(rng, config), True, config),
                                  _gpt([caption(scene)] + [c for c, _ in worse])]})

            # RL prompts with verifiable answers (VQA): one question per image
            rng = _rng(seed, sid, i, _RL)
            t = qtypes[i % nq]
            qa = ask(scene, t, rng, config, variant=_variant(t, i // nq))
            files[f"rl_{split}"].append(_vqa_record(f"rl-{split}-{i:05d}", rel, qa, config))

            # unpaired (KTO): one desirable and one undesirable example on different prompts
            rng = _rng(seed, sid, i, _KTO)
            kto_types = qtypes + ("caption",)
            for j, good in enumerate((True, False)):
                t = kto_types[(i + j) % len(kto_types)]
                if t == "caption":
                    prompt, truth = _caption_prompt(rng, config), caption(scene)
                    completion = truth if good else corrupted_captions(
                        scene, rng, config, [CAPTION_ERROR_KINDS[i % 3]])[0][0]
                else:
                    qa = ask(scene, t, rng, config,
                             variant=_variant(t, i // len(kto_types)))
                    prompt = qa.question
                    completion = qa.answer if good else wrong_answer(scene, qa, rng, config)
                files[f"kto_{split}"].append({
                    "id": f"kto-{split}-{i:05d}-{'good' if good else 'bad'}",
                    "prompt": _with_image(prompt, config),
                    "completion": completion, "label": good, "images": [rel], "question_type": t})
    return files


def _description(i: int, rel: str, scene: Scene, config: ShapesConfig, hallucinated: int) -> dict | None:
    """Train image ``i``'s description conversation for the SFT mix, or None for the images
    outside the ``descriptions`` share. A ``hallucination`` share of them mention an object the
    image does not hold (kind ``hallucination_kinds[hallucinated % len]``: the kinds in turn over
    the file); ``hallucinated`` lists the kinds applied ([] for a faithful description)."""
    rng = _rng(config.seed, _SPLIT_ID["train"], i, _DESCRIBE)
    if rng.random() >= config.descriptions:
        return None
    prompt, text, applied = _caption_prompt(rng, config), caption(scene), []
    if rng.random() < config.hallucination:
        kinds = config.hallucination_kinds
        (text, applied), = corrupted_captions(scene, rng, config, [kinds[hallucinated % len(kinds)]])
    return {"id": f"describe-train-{i:05d}", "image": rel, "hallucinated": applied,
            "conversations": [_human(prompt, True, config), _gpt(text)]}


def _vqa_record(rid: str, image: str, qa: QA, config: ShapesConfig) -> dict:
    rec = {"id": rid, "image": image, "question": _with_image(qa.question, config), "answer": qa.answer,
           "question_type": qa.question_type}
    if qa.question_type == "existence":
        rec["label"] = qa.answer
    return rec


def _write(path: Path, data: bytes) -> None:
    # Skip identical rewrites (keeps mtimes of unchanged files; output is the same either way).
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.write_bytes(data)


_IMAGE_NAME = re.compile(r"^(train|eval)_\d{5}\.png$")


def generate_shapesworld(out_dir: str | Path, config: ShapesConfig | None = None) -> dict[str, Path]:
    """Generate the ShapesWorld dataset under ``out_dir`` and return the written paths.

    Keys: ``images`` (the folder), each name of :data:`FILES` (``captions_train``, ``vqa_eval``,
    ``pope_eval``, ``dpo_train``, ...) and ``manifest``. Same config -> byte-identical files.
    Stale ``images/{train,eval}_NNNNN.png`` from an earlier, larger generation are removed.
    """
    config = config or ShapesConfig()
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    scenes = make_scenes(config)
    wanted = set()
    image_digest = hashlib.sha256()
    for split in SPLITS:
        for rel, _, png in scenes[split]:
            _write(out / rel, png)
            wanted.add(Path(rel).name)
            image_digest.update(rel.encode() + b"\0" + hashlib.sha256(png).digest())
    for p in img_dir.iterdir():
        if _IMAGE_NAME.match(p.name) and p.name not in wanted:
            p.unlink()

    records = build_records(config, scenes)
    paths: dict[str, Path] = {"images": img_dir}
    sha: dict[str, str] = {}
    for name, (fname, _, _) in FILES.items():
        data = _dump_jsonl(records[name]) if fname.endswith(".jsonl") else _dump_json(records[name])
        _write(out / fname, data)
        paths[name] = out / fname
        sha[fname] = hashlib.sha256(data).hexdigest()

    manifest = {
        "generator": "vlmalign.data.synthetic.shapesworld",
        "version": GENERATOR_VERSION,
        "config": config.to_dict(),
        "image_root": ".",
        "images": {s: len(scenes[s]) for s in SPLITS},
        "images_sha256": image_digest.hexdigest(),
        "counts": {name: len(records[name]) for name in FILES},
        "files": {name: fname for name, (fname, _, _) in FILES.items()},
        "formats": {name: fmt for name, (_, fmt, _) in FILES.items()},
        "kinds": {name: kind for name, (_, _, kind) in FILES.items()},
        "sha256": sha,
        "question_templates": {k: list(v) for k, v in TEMPLATES.items()},
        "sft_mix": _sft_mix(records["sft_train"]),
        "answers": {"count": "digits, e.g. \"2\"", "existence": "yes / no",
                    "position": "cell name, e.g. \"top left\""},
    }
    _write(out / "manifest.json", _dump_json(manifest))
    paths["manifest"] = out / "manifest.json"
    return paths


def _sft_mix(records: list[dict]) -> dict[str, Any]:
    """What ``sft_train.json`` holds: VQA conversations, descriptions, hallucinated descriptions
    (per kind) and their ids."""
    described = [r for r in records if "hallucinated" in r]
    bad = [r for r in described if r["hallucinated"]]
    kinds: dict[str, int] = {}
    for r in bad:
        for k in r["hallucinated"]:
            kinds[k] = kinds.get(k, 0) + 1
    return {"vqa_conversations": len(records) - len(described), "descriptions": len(described),
            "hallucinated_descriptions": len(bad), "hallucination_kinds": dict(sorted(kinds.items())),
            "hallucinated_ids": [r["id"] for r in bad]}


def load_scenes(out_dir: str | Path) -> dict[str, Scene]:
    """Ground truth of a generated dataset: ``{relative image path: Scene}``."""
    rows = json.loads((Path(out_dir) / FILES["scenes"][0]).read_text())
    return {r["image"]: Scene.from_json(r) for r in rows}


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "manifest.json").read_text())
