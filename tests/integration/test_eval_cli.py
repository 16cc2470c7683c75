"""`vlmalign eval` as a user runs it: benchmark files in their public layouts, predictions written
by hand and scored against values worked out by hand from each benchmark's rule; `eval compare`;
`eval.tasks` during training on the model in memory."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from vlmalign.cli.main import main


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _mme(root):
    """Two MME subtasks in the two folder layouts: existence (images and .txt side by side) and
    artwork (images/ + questions_answers_YN/)."""
    ex = root / "existence"
    ex.mkdir(parents=True)
    for name, colour in (("a", "red"), ("b", "blue")):
        (ex / f"{name}.png").write_bytes(_png(colour))
        (ex / f"{name}.txt").write_text("Is there a dog? Please answer yes or no.\tYes\n"
                                        "Is there a cat? Please answer yes or no.\tNo\n")
    art = root / "artwork"
    (art / "images").mkdir(parents=True)
    (art / "questions_answers_YN").mkdir()
    (art / "images" / "c.png").write_bytes(_png("green"))
    (art / "questions_answers_YN" / "c.txt").write_text("Is this by Monet? Please answer yes or no.\tYes\n"
                                                       "Is this by Dali? Please answer yes or no.\tNo\n")
    return root


def test_mme_predictions_scored_by_hand(tmp_path, capsys):
    bench = _mme(tmp_path / "MME")
    rc, out, err = _run(capsys, "eval", "--task", "mme", "--data", str(bench), "--predictions",
                        str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r0"))
    assert rc == 2 and "none.jsonl" in err
    from vlmalign.eval.readers import read_benchmark
    items = read_benchmark(str(bench)).items
    # existence/a: both right; existence/b: the dog question wrong ("No"), the cat one right;
    # artwork/c: Monet right, Dali wrong ("Yes")
    answers = {"a": ["Yes", "No"], "b": ["No", "No"], "c": ["Yes", "Yes"]}
    rows = []
    asked: dict[str, int] = {}
    for it in items:
        image = it.group.rsplit("/", 1)[-1].split(".")[0]
        k = asked.get(image, 0)
        asked[image] = k + 1
        rows.append({"question_id": it.id, "text": answers[image][k]})
    preds = tmp_path / "answers.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = _run(capsys, "eval", "--task", "mme", "--data", str(bench), "--predictions", str(preds),
                        "--out", str(tmp_path / "r1"))
    assert rc == 0, err
    m = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    # existence: 3 of 4 questions right (acc 0.75), 1 of 2 images with both right (acc+ 0.5): 75 + 50 = 125
    assert m["existence/acc"] == 0.75 and m["existence/acc_plus"] == 0.5 and m["existence/score"] == 125
    # artwork: 1 of 2 right (0.5), no image with both (0): 50; perception = 125 + 50
    assert m["artwork/score"] == 50 and m["perception"] == 175
    rows = [json.loads(x) for x in (tmp_path / "r1" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and sum(r["correct"] for r in rows) == 4
    report = (tmp_path / "r1" / "report.md").read_text()
    assert "existence" in report and (tmp_path / "r1" / "chart.png").exists()


def _mmbench_tsv(path):
    """VLMEvalKit's MMBench layout: 2 questions, base64 images."""
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "C", "answer", "category", "l2-category", "split",
                    "image"])
        w.writerow([0, "What colour?", "", "red", "blue", "green", "A", "colour", "perception", "dev",
                    base64.b64encode(_png("red")).decode()])
        w.writerow([1, "Which shape?", "", "circle", "square", "", "B", "shape", "perception", "dev",
                    base64.b64encode(_png("blue")).decode()])
    return path


def test_mmbench_circular_from_hand_written_predictions_and_compare(tmp_path, capsys):
    tsv = _mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv")
    # rotations (built by the task): question 0 has 3 options -> ids 0, 0+1, 0+2; question 1 has 2 -> 1, 1+1.
    # rotation k moves option k to A: q0's right option "red" is A, then C (k=1: blue, green, red), then B.
    good = {"0": "A", "0+1": "C", "0+2": "B", "1": "B", "1+1": "A"}
    bad = {**good, "0+2": "The answer is C"}          # one rotation wrong: q0 fails CircularEval
    runs = []
    for name, preds in (("good", good), ("bad", bad)):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in preds.items()))
        rc, _, err = _run(capsys, "eval", "--task", "mmbench", "--data", str(tsv), "--predictions", str(f),
                          "--out", str(tmp_path / name))
        assert rc == 0, err
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert runs[0]["accuracy"] == 1.0 and runs[0]["n"] == 2 and runs[0]["n_records"] == 5
    assert runs[1]["accuracy"] == 0.5 and runs[1]["vanilla_accuracy"] == pytest.approx(4 / 5)
    assert runs[1]["accuracy/colour"] == 0.0 and runs[1]["accuracy/shape"] == 1.0
    rc, out, err = _run(capsys, "eval", "compare", str(tmp_path / "good"), str(tmp_path / "bad"), "--json",
                        str(tmp_path / "cmp.json"))
    assert rc == 0, err
    assert "| accuracy | 1 | 0.5 | -0.5 |" in out
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp["delta"]["accuracy"] == [0.0, -0.5] and cmp["metrics"]["n"] == [2, 2]


def test_bad_inputs_name_file_row_and_field(tmp_path, capsys):
    tsv = _mmbench_tsv(tmp_path / "mmb.tsv")
    text = tsv.read_text().splitlines()
    text[2] = text[2].replace("\tB\tshape", "\tD\tshape")         # answer D: not an option of row 1
    tsv.write_text("\n".join(text) + "\n")
    rc, _, err = _run(capsys, "eval", "--task", "mmbench", "--data", str(tsv), "--predictions", str(tsv))
    assert rc == 2 and "mmb.tsv" in err and "answer" in err
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "missing.png", "text": "Is there a cat?", "answer": "no"})
                 + "\n")
    rc, _, err = _run(capsys, "eval", "--task", "pope", "--data", str(q), "--predictions", str(q))
    assert rc == 2 and "q.jsonl" in err and "missing.png" in err
    rc, _, err = _run(capsys, "eval", "--task", "popee", "--data", str(q), "--predictions", str(q))
    assert rc == 2 and "did you mean pope" in err


def test_eval_tasks_during_training_use_the_model_in_memory(tmp_path, monkeypatch):
    """sft for 2 steps with a POPE eval every step: metrics logged per step under eval/pope/,
    each eval's run dir written, and no model loaded for them."""
    from vlmalign.config import load_config
    from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
    from vlmalign.data.synthetic.benchmarks import write_benchmarks
    from vlmalign.methods.registry import get
    data = tmp_path / "data"
    generate_shapesworld(data, ShapesConfig(train_images=8, eval_images=4, seed=0))
    bench = write_benchmarks(data)
    import vlmalign.eval.runner as runner
    monkeypatch.setattr(runner, "load_model", lambda cfg: pytest.fail("eval.tasks loaded a model"))
    m = get("sft")
    cfg = load_config(m.config, None, [
        "model.tiny=llava", f"data.train_file={data / 'vqa_train.json'}", "train.max_steps=2",
        "train.batch_size=4", f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "eval.every=1",
        f"eval.tasks=[{{task: pope, data: {bench['pope_random']}, image_root: {data}, max_new_tokens: 3}}]"])
    result, _ = m.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "eval/pope/accuracy" in r]
    assert steps == [1, 2]
    assert "eval/pope/f1" in result.metrics
    assert (tmp_path / "run" / "eval" / "step-2" / "pope" / "predictions.jsonl").exists()


def test_eval_tasks_entries_are_checked_before_training():
    from vlmalign.config import ConfigError, load_config
    from vlmalign.methods.registry import get
    m = get("dpo")
    with pytest.raises(ConfigError, match="model"):
        get("dpo").train(load_config(m.config, None, ["eval.tasks=[{task: pope, data: x, model: y}]"]))
    with pytest.raises(ConfigError, match="did you mean data"):
        get("dpo").train(load_config(m.config, None, ["eval.tasks=[{task: pope, dta: x}]"]))
