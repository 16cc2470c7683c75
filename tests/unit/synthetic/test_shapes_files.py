"""Generated files: answers agree with the scenes, splits are disjoint, hallucinations are
really wrong, POPE is exactly balanced, formats are what the docs say."""

import hashlib
import json
from collections import Counter

import numpy as np
from PIL import Image

from vlmalign.data.synthetic import (FILES, answer_matches, caption, caption_errors, hallucinated_mentions,
                                     parse_caption,
                                     render)
from vlmalign.data.synthetic.config import CAPTION_ERROR_KINDS
from vlmalign.data.synthetic.tasks import absent_objects


def _placed(dataset, text: str, explicit: bool = True) -> str:
    """``text`` with the image placeholder where the dataset's ``image_position`` puts it
    (before the text only LLaVA files, ``explicit``, spell it out)."""
    if dataset.config.image_position == "after":
        return text + "\n<image>"
    return "<image>\n" + text if explicit else text


def _unplaced(dataset, value: str, explicit: bool = True) -> str:
    """The text of ``value``, checking that the placeholder is exactly where it belongs."""
    text = value.replace("<image>", "").strip()
    assert value == _placed(dataset, text, explicit), value
    return text


def _split_of(rel):
    return "train" if rel.startswith("images/train_") else "eval"


def test_every_file_written_and_listed(dataset):
    manifest = json.loads(dataset.paths["manifest"].read_text())
    assert manifest["config"] == dataset.config.to_dict()
    for name, (fname, fmt, kind) in FILES.items():
        data = dataset.paths[name].read_bytes()
        assert manifest["files"][name] == fname and manifest["formats"][name] == fmt
        assert manifest["kinds"][name] == kind
        assert manifest["sha256"][fname] == hashlib.sha256(data).hexdigest()
        assert manifest["counts"][name] == len(dataset.load(name)) > 0
    pngs = sorted(p.name for p in dataset.paths["images"].iterdir())
    assert len(pngs) == dataset.config.train_images + dataset.config.eval_images
    assert manifest["images"] == {"train": dataset.config.train_images,
                                  "eval": dataset.config.eval_images}


def test_images_on_disk_are_renders_of_their_scenes(dataset):
    for rel, scene in dataset.scenes.items():
        with Image.open(dataset.root / rel) as im:
            assert im.mode == "RGB" and im.size == (dataset.config.image_size,) * 2
            assert np.array_equal(np.asarray(im), np.asarray(render(scene)))


def test_splits_use_disjoint_images(dataset):
    train = {r for r in dataset.scenes if _split_of(r) == "train"}
    evals = {r for r in dataset.scenes if _split_of(r) == "eval"}
    assert len(train) == dataset.config.train_images and len(evals) == dataset.config.eval_images
    pix = lambda r: hashlib.sha256(np.asarray(Image.open(dataset.root / r)).tobytes()).digest()
    assert not {pix(r) for r in train} & {pix(r) for r in evals}, "an eval image equals a train image"
    for name in FILES:
        if name == "scenes":
            continue
        split = "train" if name.endswith("_train") else "eval"
        for rec in dataset.load(name):
            for img in rec.get("images") or [rec["image"]]:
                assert _split_of(img) == split, (name, img)
                assert (dataset.root / img).is_file()


def test_captions_describe_scenes_exactly(dataset, oracle, is_caption_prompt):
    for name in ("captions_train", "captions_eval"):
        for rec in dataset.load(name):
            human, gpt = rec["conversations"]
            assert human["from"] == "human"
            assert is_caption_prompt(_unplaced(dataset, human["value"]))
            scene = dataset.scenes[rec["image"]]
            assert sorted(parse_caption(gpt["value"])) == sorted(
                (o.colour, o.shape, o.cell) for o in scene.objects)
            assert caption_errors(gpt["value"], scene) == 0
            assert gpt["value"] == caption(scene)


def test_vqa_train_answers_are_true(dataset, oracle, is_caption_prompt):
    turns = Counter()
    for rec in dataset.load("vqa_train"):
        conv = rec["conversations"]
        scene = dataset.scenes[rec["image"]]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        _unplaced(dataset, conv[0]["value"])
        assert sum(t["value"].count("<image>") for t in conv) == 1
        turns[len(conv) // 2] += 1
        for q, a in zip(conv[0::2], conv[1::2]):
            question = q["value"].replace("<image>", "").strip()
            assert a["value"] == oracle(question, scene), (question, a["value"], scene)
    assert turns[1] > 0 and (max(turns) > 1 or dataset.config.max_turns == 1), "single- and multi-turn records"
    assert max(turns) <= dataset.config.max_turns


def test_vqa_format_answers_are_true(dataset, oracle, is_caption_prompt):
    for name in ("vqa_eval", "rl_train", "rl_eval", "pope_eval"):
        recs = dataset.load(name)
        assert Counter(r["question_type"] for r in recs).keys() <= set(dataset.config.question_types)
        for r in recs:
            scene = dataset.scenes[r["image"]]
            _unplaced(dataset, r["question"], explicit=False)
            assert r["answer"] == oracle(r["question"], scene), (name, r)
            if r["question_type"] == "count":
                assert r["answer"].isdigit()
                if r["question"].lower().startswith(("how many shapes", "how many objects",
                                                     "count the shapes")):
                    assert int(r["answer"]) == len(scene.objects)
            if r["question_type"] == "existence":
                assert r["label"] == r["answer"] in ("yes", "no")


def test_vqa_eval_covers_every_type_per_image(dataset):
    recs = dataset.load("vqa_eval")
    per_image = Counter(r["image"] for r in recs)
    assert set(per_image.values()) == {len(dataset.config.question_types)}
    assert len(per_image) == dataset.config.eval_images
    ex = Counter(r["answer"] for r in recs if r["question_type"] == "existence")
    assert abs(ex["yes"] - ex["no"]) <= 1


def test_pope_is_exactly_balanced(dataset):
    recs = dataset.load("pope_eval")
    counts = Counter((r["category"], r["label"]) for r in recs)
    n = dataset.config.eval_images  # adversarial negatives always exist in these configs
    assert counts == {("random", "yes"): n, ("random", "no"): n,
                      ("adversarial", "yes"): n, ("adversarial", "no"): n}
    for r in recs:
        scene = dataset.scenes[r["image"]]
        colour, shape = r["object"].split()
        assert scene.has(colour, shape) == (r["label"] == "yes")
        if r["label"] == "no" and r["category"] == "adversarial":
            assert colour in scene.colours_present or shape in scene.shapes_present
            assert (colour, shape) in absent_objects(scene, dataset.config, "adversarial")


def test_preference_pairs_chosen_right_rejected_wrong(dataset, oracle, is_caption_prompt):
    for name in ("dpo_train", "dpo_eval"):
        recs = dataset.load(name)
        kinds = Counter()
        for r in recs:
            assert set(r) == {"id", "image", "prompt", "chosen", "rejected", "question_type", "error"}
            _unplaced(dataset, r["prompt"], explicit=False)
            scene = dataset.scenes[r["image"]]
            kinds[r["error"]] += 1
            if r["question_type"] == "caption":
                assert is_caption_prompt(r["prompt"])
                assert caption_errors(r["chosen"], scene) == 0
                assert caption_errors(r["rejected"], scene) == 1, r
                assert r["error"] in ("colour", "shape", "extra_object")
            else:
                truth = oracle(r["prompt"], scene)
                assert answer_matches(r["chosen"], truth)
                assert not answer_matches(r["rejected"], truth), r
                assert r["error"] == "wrong_" + r["question_type"]
        n_images = len({r["image"] for r in recs})
        assert len(recs) == 2 * n_images
        # every hallucination kind is represented (the small sets are big enough for all)
        assert {"colour", "shape", "extra_object"} <= set(kinds)
        assert {"wrong_" + t for t in dataset.config.question_types} <= set(kinds)
        chosen_ex = Counter(r["chosen"] for r in recs if r["question_type"] == "existence")
        assert abs(chosen_ex["yes"] - chosen_ex["no"]) <= 1, chosen_ex


def test_ranked_lists_strictly_ordered_by_errors(dataset):
    k = dataset.config.ranked_size
    for name in ("ranked_train", "ranked_eval"):
        for r in dataset.load(name):
            human, gpt = r["conversations"]
            _unplaced(dataset, human["value"])
            responses = gpt["value"]
            assert isinstance(responses, list) and len(responses) == k
            scene = dataset.scenes[r["image"]]
            errors = [caption_errors(c, scene) for c in responses]
            assert errors == list(range(k)) == r["num_errors"], (errors, responses)
            assert len(set(responses)) == k


def test_kto_labels_are_true(dataset, oracle, is_caption_prompt):
    for name in ("kto_train", "kto_eval"):
        recs = dataset.load(name)
        assert Counter(r["label"] for r in recs)[True] == Counter(r["label"] for r in recs)[False]
        for r in recs:
            assert isinstance(r["label"], bool) and len(r["images"]) == 1
            _unplaced(dataset, r["prompt"], explicit=False)
            scene = dataset.scenes[r["images"][0]]
            if r["question_type"] == "caption":
                assert (caption_errors(r["completion"], scene) == 0) == r["label"]
            else:
                assert answer_matches(r["completion"], oracle(r["prompt"], scene)) == r["label"], r
        lines = dataset.paths[name].read_text().splitlines()
        assert len(lines) == len(recs)


def test_description_pairs_hallucinate_or_omit_one_object(dataset, is_caption_prompt):
    kinds = dataset.config.hallucination_kinds
    for name in ("hallucination_train", "hallucination_eval"):
        recs = dataset.load(name)
        n_images = len(dataset.load(name.replace("hallucination", "captions")))
        assert len(recs) == 2 * n_images and len({r["image"] for r in recs}) == n_images
        for k, r in enumerate(recs):
            i, omitted = divmod(k, 2)
            assert r["id"].endswith("-omitted" if omitted else "-hallucinated")
            assert is_caption_prompt(_unplaced(dataset, r["prompt"], explicit=False))
            scene = dataset.scenes[r["image"]]
            assert caption_errors(r["chosen"], scene) == 0 and hallucinated_mentions(r["chosen"], scene) == 0
            assert caption_errors(r["rejected"], scene) == 1, r
            if omitted:
                assert r["error"] == "omission" and hallucinated_mentions(r["rejected"], scene) == 0
                assert len(parse_caption(r["rejected"])) == len(scene.objects) - 1
            else:
                assert hallucinated_mentions(r["rejected"], scene) == 1, r
                assert r["error"] == kinds[i % len(kinds)] or len(kinds) == 1 and r["error"] in CAPTION_ERROR_KINDS


def test_qa_pairs_are_the_description_pairs_with_existence_questions_about_the_made_up_object(dataset, oracle):
    for split in ("train", "eval"):
        plain, qa = dataset.load(f"hallucination_{split}"), dataset.load(f"hallucination_qa_{split}")
        assert len(qa) == 2 * len(plain)
        for k in range(0, len(qa), 4):
            made_up, absent, present, omitted = qa[k:k + 4]
            assert [made_up, omitted] == plain[k // 2:k // 2 + 2]     # the same description pairs
            scene = dataset.scenes[made_up["image"]]
            invented = [(c, s) for c, s, _ in parse_caption(made_up["rejected"]) if not scene.has(c, s)]
            for q, answer in ((absent, "no"), (present, "yes")):
                assert q["image"] == made_up["image"] and q["question_type"] == "existence"
                assert (q["chosen"], q["rejected"]) == (answer, "no" if answer == "yes" else "yes")
                assert oracle(q["prompt"], scene) == answer, q
            assert "{} {}".format(*invented[0]) in absent["prompt"], (absent, invented)


def test_sft_mix_is_vqa_plus_the_described_share(tmp_path):
    from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld, load_scenes
    cfg = ShapesConfig(seed=3, train_images=400, eval_images=10, descriptions=0.5, hallucination=0.4,
                       hallucination_kinds=("extra_object", "colour"))
    paths = generate_shapesworld(tmp_path, cfg)
    load = lambda name: json.loads(paths[name].read_text())
    scenes = load_scenes(tmp_path)
    mix, vqa = load("sft_train"), load("vqa_train")
    described = [r for r in mix if "hallucinated" in r]
    assert [r for r in mix if "hallucinated" not in r] == vqa           # every VQA record, unchanged
    bad = [r for r in described if r["hallucinated"]]
    assert 160 <= len(described) <= 240 and 0.3 * len(described) <= len(bad) <= 0.5 * len(described)
    for r in described:
        text, scene = r["conversations"][1]["value"], scenes[r["image"]]
        assert hallucinated_mentions(text, scene) == len(r["hallucinated"]) == caption_errors(text, scene)
    assert [r["hallucinated"][0] for r in bad] == [("extra_object", "colour")[k % 2] for k in range(len(bad))]
    mixed = json.loads(paths["manifest"].read_text())["sft_mix"]
    assert mixed == {"vqa_conversations": len(vqa), "descriptions": len(described),
                     "hallucinated_descriptions": len(bad),
                     "hallucination_kinds": dict(Counter(r["hallucinated"][0] for r in bad)),
                     "hallucinated_ids": [r["id"] for r in bad]}
    clean = ShapesConfig(seed=3, train_images=400, eval_images=10)
    generate_shapesworld(tmp_path / "clean", clean)
    assert json.loads((tmp_path / "clean" / "sft_train.json").read_text()) == vqa   # share 0: the VQA file
