"""`eval.runner.evaluate` with a tiny random-init model: run dir files, one image encoding per
question in circular and likelihood modes, resume after a kill, scoring a predictions file."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.data.schema import ImageRef
from vlmalign.errors import DataError, VlmalignError
from vlmalign.eval.answering import batches, rank_options
from vlmalign.eval.items import EvalItem
from vlmalign.eval.runner import EvalConfig, evaluate
from vlmalign.eval.tasks import get_task
from vlmalign.models import adapter_for, build_tiny

COLOURS = ["red", "green", "blue", "yellow", "purple"]


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    model, processor = build_tiny("llava")
    return adapter_for(model.eval(), processor)


def _images(root, n):
    for i in range(n):
        im = Image.new("RGB", (48, 48), "white")
        ImageDraw.Draw(im).ellipse([8, 8, 40, 40], fill=COLOURS[i % len(COLOURS)])
        im.save(root / f"img{i}.png")


def _mc_items(n):
    return [EvalItem(id=f"q{i}", question="What colour is the circle?", images=[ImageRef(path=f"img{i}.png")],
                     answer="ABCD"[i % 4], options={"A": "red", "B": "green", "C": "blue", "D": "yellow"},
                     category="colour" if i % 2 else "shape", source="mc.tsv", index=i) for i in range(n)]


class CountEncodes:
    """Counts images passed to adapter.encode_images (each call's batch size)."""

    def __init__(self, adapter, monkeypatch):
        self.images = 0
        inner = adapter.encode_images

        def counted(items, **kw):
            self.images += len(items)
            return inner(items, **kw)
        monkeypatch.setattr(adapter, "encode_images", counted)


def test_circular_generation_encodes_each_image_once_per_question(adapter, tmp_path, monkeypatch):
    _images(tmp_path, 5)
    task = get_task("mmbench")
    items = task.prepare(_mc_items(5))
    assert len(items) == 20 and len({it.group for it in items}) == 5
    count = CountEncodes(adapter, monkeypatch)
    cfg = EvalConfig(task="mmbench", out=str(tmp_path / "run"), batch_size=6, progress=False)
    res = evaluate(cfg, adapter=adapter, items=items, image_root=str(tmp_path))
    assert count.images == 5            # 20 rotations, 5 questions, 5 encodings
    assert res.metrics["n"] == 5 and res.metrics["n_records"] == 20
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [it.id for it in items]
    assert {"id", "question", "prediction", "parsed", "correct", "answer"} <= set(rows[0])
    assert "A. red\nB. green" in rows[0]["question"] and "A. green\nB. blue" in rows[1]["question"]
    for name in ("config.yaml", "metrics.json", "report.md"):
        assert (tmp_path / "run" / name).exists()
    # the rotation moved the right letter with its option
    q1 = [it for it in items if it.group == "q1"]
    assert [it.options[it.answer] for it in q1] == ["green"] * 4


def test_batches_keep_groups_together():
    items = get_task("mmbench").prepare(_mc_items(3))   # 3 groups of 4
    sizes = [len(b) for b in batches(items, 6)]
    assert sizes == [4, 4, 4]
    assert [len(b) for b in batches(items, 8)] == [8, 4]


def test_likelihood_ranking_one_encoding_per_question_and_scores_match_a_plain_forward(adapter, tmp_path,
                                                                                        monkeypatch):
    _images(tmp_path, 3)
    items = _mc_items(3)
    task = get_task("seed")
    count = CountEncodes(adapter, monkeypatch)
    from vlmalign.data.batching import ImageLoader
    loader = ImageLoader(adapter, tmp_path)
    prompts = [task.prompt(it) for it in items]
    scores = rank_options(adapter, items, prompts, loader, norm="sum")
    assert count.images == 3            # 3 questions x 4 options, 3 encodings
    # option B of item 0 scored alone, through the model's own pixel path
    it = items[0]
    from vlmalign.eval.answering import messages
    img = loader.inputs(it.images[0])
    p_ids, c_ids, _ = adapter.tokenize_completion(messages(it, prompts[0]), "green", [img])
    c_ids = [t for t in c_ids if t not in set(adapter.stop_token_ids())]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        out = adapter.forward(ids, torch.ones_like(ids), pixel_inputs=adapter.collate_images([img]))
    lp = torch.log_softmax(out.logits[0].float(), -1)
    want = sum(lp[len(p_ids) - 1 + k, t].item() for k, t in enumerate(c_ids))
    assert scores[0]["B"] == pytest.approx(want, abs=1e-4)
    res = evaluate(EvalConfig(task="seed", mode="likelihood", progress=False), adapter=adapter, items=items,
                   image_root=str(tmp_path), write=False)
    assert res.metrics["unparsable"] == 0 and res.metrics["n"] == 3
    assert all(set(r["option_scores"]) == {"A", "B", "C", "D"} for r in res.rows)


def test_interrupted_eval_resumes_without_reasking_and_gives_the_same_metrics(adapter, tmp_path, monkeypatch):
    _images(tmp_path, 5)
    items = get_task("mmbench").prepare(_mc_items(5))
    full = evaluate(EvalConfig(task="mmbench", out=str(tmp_path / "a"), batch_size=4, progress=False),
                    adapter=adapter, items=items, image_root=str(tmp_path))
    # a run killed after its second batch: 8 rows written and half of a ninth
    run = tmp_path / "b"
    import vlmalign.eval.answering as answering
    calls = {"n": 0}
    real = answering.generate_answers

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(answering, "generate_answers", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate(EvalConfig(task="mmbench", out=str(run), batch_size=4, progress=False), adapter=adapter,
                 items=items, image_root=str(tmp_path))
    with open(run / "predictions.jsonl", "a") as f:
        f.write('{"id": "q2", "predic')
    monkeypatch.setattr(answering, "generate_answers", real)
    asked = []
    monkeypatch.setattr(answering, "generate_answers",
                        lambda ad, batch, *a, **k: asked.extend(it.id for it in batch) or real(ad, batch, *a, **k))
    again = evaluate(EvalConfig(task="mmbench", out=str(run), batch_size=4, progress=False), adapter=adapter,
                     items=items, image_root=str(tmp_path))
    assert asked == [it.id for it in items[8:]]
    assert again.metrics == full.metrics
    lines = (run / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 20 and len({json.loads(x)["id"] for x in lines}) == 20


def test_other_settings_in_the_same_run_dir_are_refused(adapter, tmp_path):
    _images(tmp_path, 2)
    items = _mc_items(2)
    evaluate(EvalConfig(task="seed", out=str(tmp_path / "r"), progress=False), adapter=adapter, items=items,
             image_root=str(tmp_path))
    with pytest.raises(VlmalignError, match="other settings"):
        evaluate(EvalConfig(task="seed", mode="likelihood", out=str(tmp_path / "r"), progress=False),
                 adapter=adapter, items=items, image_root=str(tmp_path))


def test_missing_image_names_file_record_and_field(adapter, tmp_path):
    _images(tmp_path, 1)
    items = _mc_items(2)
    with pytest.raises(DataError) as e:
        evaluate(EvalConfig(task="seed", progress=False), adapter=adapter, items=items, image_root=str(tmp_path),
                 write=False)
    assert "mc.tsv" in str(e.value) and "record 1" in str(e.value) and "img1.png" in str(e.value)


def test_duplicate_ids_are_refused(adapter, tmp_path):
    items = _mc_items(2)
    items[1].id = "q0"
    with pytest.raises(DataError, match="used twice"):
        evaluate(EvalConfig(task="seed", progress=False), adapter=adapter, items=items, write=False)
