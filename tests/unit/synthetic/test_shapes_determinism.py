"""Same seed + config -> byte-identical files; another seed -> different files."""

import dataclasses

from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld

CONFIG = ShapesConfig(seed=3, train_images=40, eval_images=20, paraphrases=True)


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_identical_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pa = generate_shapesworld(a, CONFIG)
    pb = generate_shapesworld(b, dataclasses.replace(CONFIG))
    sa, sb = _snapshot(a), _snapshot(b)
    assert len(sa) == 40 + 20 + 20  # images + 19 data files + manifest
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k] == sb[k], f"{k} differs between two generations with the same seed"
    assert {k: v.relative_to(a) for k, v in pa.items()} == {k: v.relative_to(b) for k, v in pb.items()}


def test_regenerating_in_place_is_stable_and_removes_stale_images(tmp_path):
    generate_shapesworld(tmp_path, dataclasses.replace(CONFIG, train_images=50))
    generate_shapesworld(tmp_path, CONFIG)
    fresh = tmp_path / "fresh"
    generate_shapesworld(fresh, CONFIG)
    snap = _snapshot(tmp_path)
    snap = {k: v for k, v in snap.items() if not k.startswith("fresh/")}
    assert snap == _snapshot(fresh)


def test_different_seed_differs(tmp_path):
    sa = _snapshot(generate_shapesworld(tmp_path / "a", CONFIG)["manifest"].parent)
    sb = _snapshot(generate_shapesworld(tmp_path / "b", dataclasses.replace(CONFIG, seed=4))
                   ["manifest"].parent)
    assert sa.keys() == sb.keys()
    same = [k for k in sa if sa[k] == sb[k]]
    assert not [k for k in same if not k.startswith("images/")], same
    assert len(same) < 3, same  # at most a chance coincidence among tiny images


def test_images_do_not_depend_on_question_settings(tmp_path):
    """Each image and each file has its own random stream: asking other questions changes
    neither the images nor the captions."""
    a = _snapshot(generate_shapesworld(tmp_path / "a", CONFIG)["manifest"].parent)
    b = _snapshot(generate_shapesworld(
        tmp_path / "b", dataclasses.replace(CONFIG, question_types=("count", "existence"),
                                            max_turns=1))["manifest"].parent)
    for k in a:
        if k.startswith("images/") or k.startswith("captions_") or k == "scenes.json":
            assert a[k] == b[k], k
    assert a["vqa_eval.json"] != b["vqa_eval.json"]
