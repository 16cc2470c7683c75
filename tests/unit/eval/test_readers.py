"""Benchmark readers: small files built in the public layouts, items and located errors."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vlmalign.errors import DataError
from vlmalign.eval.readers import LAYOUTS, detect_layout, read_benchmark, read_predictions

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def png(color: str, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), COLORS[color]).save(buf, format=fmt)
    return buf.getvalue()


def color_of(data: bytes) -> tuple:
    return Image.open(io.BytesIO(data)).convert("RGB").getpixel((3, 3))


def save(path: Path, color: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), COLORS[color]).save(path)
    return path


def b64(color: str) -> str:
    return base64.b64encode(png(color)).decode()


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def raises(fn, *parts):
    """The DataError of ``fn()``; its message names every part (file, record, field)."""
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    for p in parts:
        assert str(p) in msg, (p, msg)
    return e.value


# ---------------------------------------------------------------- VLMEvalKit TSV

MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
              "l2-category", "split", "image"]


def mmbench_tsv(tmp_path, rows=None):
    rows = rows or [
        [0, "What colour?", "Look closely", "red", "green", "blue", "", "A", "color", "attr",
         "dev", b64("red")],
        [1000000, "What colour?", "Look closely", "green", "blue", "red", "", "C", "color",
         "attr", "dev", "0"],  # circular copy: image is a reference to row index 0
        [1, "Which shape?", "", "square", "circle", "", "", "B", "shape", "attr", "dev",
         b64("blue")],
    ]
    return write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_HEADER, rows)


def test_vlmevalkit_mmbench_options_answers_groups_and_references(tmp_path):
    path = mmbench_tsv(tmp_path)
    assert detect_layout(path) == "vlmevalkit_tsv"
    b = read_benchmark(path)
    assert (b.layout, b.image_root) == ("vlmevalkit_tsv", None)
    a, copy, c = b.items
    assert [it.id for it in b.items] == ["0", "1000000", "1"]
    assert a.options == {"A": "red", "B": "green", "C": "blue"}   # empty D is no option
    assert c.options == {"A": "square", "B": "circle"}
    assert (a.answer, copy.answer, c.answer) == ("A", "C", "B")
    assert (a.group, copy.group, c.group) == ("0", "0", "1")
    assert color_of(copy.images[0].data) == COLORS["red"] == color_of(a.images[0].data)
    assert (a.hint, c.hint, a.category, a.split) == ("Look closely", None, "color", "dev")
    assert a.meta["l2-category"] == "attr"
    assert (a.source, copy.index) == (str(path), 1)


def test_vlmevalkit_yes_no_and_multi_image(tmp_path):
    multi = str([b64("red"), b64("green")])
    path = write_tsv(tmp_path / "MME.tsv", ["index", "image", "question", "answer", "category"],
                     [[7, b64("blue"), "Is it blue?", "Yes", "color"],
                      [8, multi, "Are they the same?", "No", "color"]])
    one, two = read_benchmark(path).items
    assert (one.answer, two.answer, one.options) == ("yes", "no", None)
    assert [color_of(i.data) for i in two.images] == [COLORS["red"], COLORS["green"]]


@pytest.mark.parametrize("row, field, reason", [
    ([5, "Q?", "", "x", "y", "", "", "A", "c", "l", "dev", "!!notbase64" * 10], "image",
     "bad base64"),
    ([5, "Q?", "", "x", "y", "", "", "A", "c", "l", "dev", "42"], "image", "no row has"),
    ([5, " ", "", "x", "y", "", "", "A", "c", "l", "dev", b64("red")], "question",
     "empty question"),
    ([5, "Q?", "", "x", "y", "", "", "D", "c", "l", "dev", b64("red")], "answer",
     "not one of the options"),
])
def test_vlmevalkit_errors_name_file_row_field(tmp_path, row, field, reason):
    good = [0, "Q?", "", "x", "y", "", "", "A", "c", "l", "dev", b64("red")]
    path = mmbench_tsv(tmp_path, [good, row])
    raises(lambda: read_benchmark(path), path, "record 1", f"field {field!r}", reason)


def test_vlmevalkit_missing_column(tmp_path):
    path = write_tsv(tmp_path / "x.tsv", ["index", "image", "answer"], [[0, b64("red"), "A"]])
    raises(lambda: read_benchmark(path), path, "field 'question'", "missing column")


def test_no_items_is_an_error(tmp_path):
    path = write_tsv(tmp_path / "x.tsv", MMB_HEADER, [])
    raises(lambda: read_benchmark(path), path, "no items")


def test_duplicate_ids_name_both_records(tmp_path):
    row = [3, "Q?", "", "x", "y", "", "", "A", "c", "l", "dev", b64("red")]
    path = mmbench_tsv(tmp_path, [row, row])
    raises(lambda: read_benchmark(path), path, "record 1", "field 'id'", "duplicate id '3'",
           "record 0")


# ---------------------------------------------------------------- Hugging Face copies

def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def img(color):
    return {"bytes": png(color), "path": None}


def test_hf_pope_parquet(tmp_path):
    rows = [{"id": str(k), "question_id": str(k % 2 + 1), "question": "Is there a dog?",
             "answer": ans, "image_source": "COCO_val2014_000000000001", "image": img("red"),
             "category": cat}
            for k, (ans, cat) in enumerate([("yes", "random"), ("no", "adversarial")])]
    path = write_parquet(tmp_path / "pope.parquet", rows)
    b = read_benchmark(path)
    assert (b.layout, b.image_root) == ("hf", None)
    assert [(it.id, it.answer, it.split) for it in b.items] == [("0", "yes", "random"),
                                                                ("1", "no", "adversarial")]
    assert color_of(b.items[0].images[0].data) == COLORS["red"]


def test_hf_mme_save_to_disk(tmp_path):
    import datasets
    rows = {"question_id": ["artwork/1.jpg", "artwork/1.jpg"], "image": [img("green")] * 2,
            "question": ["Is it green? Please answer yes or no.", "Is it red?"],
            "answer": ["Yes", "No"], "category": ["artwork", "artwork"]}
    d = tmp_path / "mme_hf"
    datasets.Dataset.from_dict(rows, features=datasets.Features({
        "question_id": datasets.Value("string"), "image": datasets.Image(),
        "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "category": datasets.Value("string")})).save_to_disk(str(d))
    assert detect_layout(d) == "hf"
    a, b = read_benchmark(d).items
    assert (a.id, b.id, a.group, a.answer, b.answer) == ("artwork/1.jpg#1", "artwork/1.jpg#2",
                                                          "artwork/1.jpg", "yes", "no")
    assert a.category == "artwork" and color_of(a.images[0].data) == COLORS["green"]


def test_hf_mmbench_scienceqa_mmmu_mmstar(tmp_path):
    mmb = write_parquet(tmp_path / "mmb.parquet", [
        {"index": 1000003, "question": "Colour?", "hint": None, "A": "red", "B": "blue",
         "C": None, "D": None, "answer": "B", "category": "c", "l2-category": "l2",
         "image": img("blue")}])
    it = read_benchmark(mmb).items[0]
    assert (it.id, it.group, it.options, it.answer) == ("1000003", "3", {"A": "red", "B": "blue"},
                                                        "B")
    sqa = write_parquet(tmp_path / "sqa.parquet", [
        {"question": "Which?", "choices": ["x", "y", "z"], "answer": 2, "hint": "h",
         "image": None, "subject": "natural science", "grade": "grade2"}])
    it = read_benchmark(sqa).items[0]
    assert (it.id, it.options, it.answer, it.images, it.category, it.meta["grade"]) == (
        "0", {"A": "x", "B": "y", "C": "z"}, "C", [], "natural science", "grade2")
    mmmu = write_parquet(tmp_path / "mmmu.parquet", [
        {"id": "validation_Art_1", "question": "<image 1> Which?", "options": "['p', 'q']",
         "answer": "A", "image_1": img("red"), "image_2": img("green"), "image_3": None,
         "question_type": "multiple-choice", "subfield": "Painting"}])
    it = read_benchmark(mmmu).items[0]
    assert (it.options, it.answer, len(it.images)) == ({"A": "p", "B": "q"}, "A", 2)
    assert color_of(it.images[1].data) == COLORS["green"]
    star = write_parquet(tmp_path / "mmstar.parquet", [
        {"index": 0, "question": "What is it?\nOptions: A: a cat, B: a dog, C: a 1:2 map, D: none",
         "answer": "C", "category": "cp", "l2_category": "fine", "image": img("red")}])
    it = read_benchmark(star).items[0]
    assert it.question == "What is it?"
    assert it.options == {"A": "a cat", "B": "a dog", "C": "a 1:2 map", "D": "none"}


def test_hf_errors(tmp_path):
    bad = write_parquet(tmp_path / "odd.parquet", [{"foo": 1, "bar": 2}])
    raises(lambda: read_benchmark(bad), bad, "unknown benchmark columns", "question")
    sqa = write_parquet(tmp_path / "sqa.parquet", [
        {"question": "Which?", "choices": ["x"], "answer": 0, "image": None},
        {"question": "Which?", "choices": ["x"], "answer": 3, "image": None}])
    raises(lambda: read_benchmark(sqa), sqa, "record 1", "field 'answer'", "index of a choice")


# ---------------------------------------------------------------- LLaVA / POPE

def pope_files(tmp_path):
    imgs = tmp_path / "val2014"
    save(imgs / "COCO_val2014_000000000001.jpg", "red")
    save(imgs / "COCO_val2014_000000000002.jpg", "blue")
    ann = tmp_path / "coco"
    ann.mkdir()
    for split, labels in (("random", ["yes", "no"]), ("adversarial", ["no", "yes"])):
        jsonl(ann / f"coco_pope_{split}.json", [
            {"question_id": k + 1, "image": f"COCO_val2014_00000000000{k + 1}.jpg",
             "text": f"Is there a {obj} in the image?", "label": lab}
            for k, (obj, lab) in enumerate(zip(["person", "dog"], labels))])
    return imgs, ann


def test_pope_layout_alone(tmp_path):
    imgs, ann = pope_files(tmp_path)
    path = ann / "coco_pope_adversarial.json"
    assert detect_layout(path) == "pope"
    b = read_benchmark(path, image_root=str(imgs))
    assert b.image_root == str(imgs)
    assert [(it.id, it.answer, it.split) for it in b.items] == [("1", "no", "adversarial"),
                                                                ("2", "yes", "adversarial")]
    assert b.items[0].images[0].path == "COCO_val2014_000000000001.jpg"


def test_llava_pope_questions_with_annotation_folder(tmp_path):
    imgs, ann = pope_files(tmp_path)
    questions = [{"question_id": 10 * s + k + 1, "image": f"COCO_val2014_00000000000{k + 1}.jpg",
                  "text": f"Is there a {obj} in the image?", "category": split}
                 for s, split in enumerate(["adversarial", "random"])
                 for k, obj in enumerate(["person", "dog"])]
    q = jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    assert detect_layout(q) == "llava_jsonl"
    b = read_benchmark(q, answers=str(ann), image_root=str(imgs))
    assert [(it.id, it.split, it.answer) for it in b.items] == [
        ("1", "adversarial", "no"), ("2", "adversarial", "yes"),
        ("11", "random", "yes"), ("12", "random", "no")]
    # one annotation file: the questions of other splits have no label -> an error
    raises(lambda: read_benchmark(q, answers=str(ann / "coco_pope_random.json"),
                                  image_root=str(imgs)), q, "record 0", "no annotation")
    questions[1]["text"] = "Is there a cat in the image?"
    jsonl(q, questions)
    raises(lambda: read_benchmark(q, answers=str(ann), image_root=str(imgs)),
           ann / "coco_pope_adversarial.json", "record 1", "field 'text'", "does not match")


def test_llava_extension_fields_and_errors(tmp_path):
    save(tmp_path / "a.png", "red")
    q = jsonl(tmp_path / "q.jsonl", [
        {"question_id": "c1", "image": "a.png", "text": "Describe.", "captions": ["a", "b"],
         "objects": ["dog"]},
        {"question_id": "m1", "image": "a.png", "text": "Which?", "options": ["x", "y"],
         "answer": "B", "category": "conv"}])
    c, m = read_benchmark(q).items
    assert (c.answer, c.meta["objects"], m.options, m.answer, m.category) == (
        ["a", "b"], ["dog"], {"A": "x", "B": "y"}, "B", "conv")
    jsonl(q, [{"question_id": 1, "image": "missing.png", "text": "Q?"}])
    raises(lambda: read_benchmark(q), q, "record 0", "field 'image'", "image file not found",
           "missing.png")
    jsonl(q, [{"question_id": 1, "image": "../../etc/passwd", "text": "Q?"}])
    raises(lambda: read_benchmark(q), q, "record 0", "field 'image'", "escapes the image root")
    jsonl(q, [{"question_id": 1, "image": "a.png"}])
    raises(lambda: read_benchmark(q, layout="llava_jsonl"), q, "record 0", "field 'text'",
           "missing field")
    p = jsonl(tmp_path / "coco_pope_random.json",
              [{"question_id": 1, "image": "a.png", "text": "Q?", "label": "maybe"}])
    raises(lambda: read_benchmark(p), p, "record 0", "field 'label'", "yes/no")


# ---------------------------------------------------------------- MME folder

def mme_root(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    save(root / "artwork" / "images" / "10002.jpg", "red")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork red? Please answer yes or no.\tYes\n"
        "Is this artwork blue? Please answer yes or no.\tNo\n")
    save(root / "code_reasoning" / "0020.png", "green")
    (root / "code_reasoning" / "0020.txt").write_text(
        "Is the output 3? Please answer yes or no.\tYes\r\nIs the output 4?\tNo\r\n")
    return root


def test_mme_dir_both_variants(tmp_path):
    root = mme_root(tmp_path)
    assert detect_layout(root) == "mme_dir"
    b = read_benchmark(root)
    assert (b.layout, b.image_root) == ("mme_dir", str(root))
    assert [(it.id, it.answer, it.category, it.group) for it in b.items] == [
        ("artwork/10002.jpg#1", "yes", "artwork", "artwork/10002.jpg"),
        ("artwork/10002.jpg#2", "no", "artwork", "artwork/10002.jpg"),
        ("code_reasoning/0020.png#1", "yes", "code_reasoning", "code_reasoning/0020.png"),
        ("code_reasoning/0020.png#2", "no", "code_reasoning", "code_reasoning/0020.png")]
    assert b.items[0].images[0].path == "artwork/images/10002.jpg"
    assert b.items[2].images[0].path == "code_reasoning/0020.png"
    assert (root / b.items[2].images[0].path).is_file()


def test_mme_dir_errors(tmp_path):
    root = mme_root(tmp_path)
    txt = root / "code_reasoning" / "0020.txt"
    txt.write_text("Is the output 3?\tYes\nIs the output 4?\tPerhaps\n")
    raises(lambda: read_benchmark(root), txt, "record 1", "field 'answer'", "yes/no")
    txt.write_text("no tab here\n")
    raises(lambda: read_benchmark(root), txt, "record 0", "field 'question'", "question<TAB>")
    txt.write_text("Q?\tYes\n")
    (root / "code_reasoning" / "0020.png").unlink()
    raises(lambda: read_benchmark(root), txt, "field 'image'", "no image 0020")


# ---------------------------------------------------------------- ScienceQA

def vla_record(id_, label, hint=True):
    value = ("Which is a mammal?\nOptions: \n(A) frog \n(B) whale \n"
             + ("Hint: Select the best answer.\nHint: really.\n\nOption:  " if hint
                else "\n\nOption:  "))
    if not hint:
        value = "Which is a mammal?\nOptions: \n(A) frog \n(B) whale\n\nOption:  "
    return {"id": id_, "image": f"{id_}/image.png" if hint else None,
            "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": label}],
            "label": label}


def test_scienceqa_vision_llm_alignment_json(tmp_path):
    save(tmp_path / "5" / "image.png", "blue")
    path = tmp_path / "sci_qa_test.json"
    path.write_text(json.dumps([vla_record("5", "B"), vla_record("11", "A", hint=False)]))
    assert detect_layout(path) == "scienceqa_json"
    a, b = read_benchmark(path).items
    assert (a.id, a.question, a.options, a.answer) == ("5", "Which is a mammal?",
                                                       {"A": "frog", "B": "whale"}, "B")
    assert a.hint == "Select the best answer.\nHint: really."
    assert a.images[0].path == "5/image.png" and b.images == [] and b.hint is None
    assert b.options == {"A": "frog", "B": "whale"} and b.answer == "A"
    path.write_text(json.dumps([vla_record("5", "B"), vla_record("6", "C", hint=False)]))
    raises(lambda: read_benchmark(path), path, "record 1", "field 'label'",
           "not one of the options")


def test_scienceqa_problems_json(tmp_path):
    save(tmp_path / "images" / "test" / "9" / "image.png", "red")
    path = tmp_path / "problems.json"
    path.write_text(json.dumps({
        "9": {"question": "Which?", "choices": ["a", "b"], "answer": 1, "hint": "", "image":
              "image.png", "split": "test", "subject": "social science", "grade": "grade4"},
        "10": {"question": "Which?", "choices": ["a", "b", "c"], "answer": 0, "hint": "h",
               "image": None, "split": "val", "subject": "language science"}}))
    assert detect_layout(path) == "scienceqa_json"
    b = read_benchmark(path)
    a, c = b.items
    assert b.image_root == str(tmp_path / "images")
    assert (a.id, a.answer, a.split, a.images[0].path, a.hint) == ("9", "B", "test",
                                                                    "test/9/image.png", None)
    assert (c.options, c.answer, c.images, c.category) == ({"A": "a", "B": "b", "C": "c"}, "A",
                                                           [], "language science")


# ---------------------------------------------------------------- HallusionBench

def test_hallusionbench_json(tmp_path):
    save(tmp_path / "hallusion_bench" / "VD" / "illusion" / "0_0.png", "red")
    base = {"category": "VD", "subcategory": "illusion", "set_id": "0", "figure_id": "0",
            "sample_note": "circle", "gt_answer_details": "the same"}
    recs = [dict(base, visual_input="1", question_id="0", question="Are they equal?",
                 gt_answer="1", filename="./hallusion_bench/VD/illusion/0_0.png"),
            dict(base, category="VS", visual_input="0", question_id="0",
                 question="Is Paris in France?", gt_answer="0", filename=None)]
    path = tmp_path / "HallusionBench.json"
    path.write_text(json.dumps(recs))
    assert detect_layout(path) == "hallusionbench_json"
    a, b = read_benchmark(path).items
    assert (a.id, a.answer, b.id, b.answer, b.images) == ("VD_illusion_0_0_0", "yes",
                                                          "VS_illusion_0_0_0", "no", [])
    assert a.images[0].path == "./hallusion_bench/VD/illusion/0_0.png"
    assert {k: a.meta[k] for k in ("category", "subcategory", "set_id", "figure_id",
                                   "question_id", "visual_input")} == {
        "category": "VD", "subcategory": "illusion", "set_id": "0", "figure_id": "0",
        "question_id": "0", "visual_input": "1"}
    recs[1]["gt_answer"] = "2"
    path.write_text(json.dumps(recs))
    raises(lambda: read_benchmark(path), path, "record 1", "field 'gt_answer'")


# ---------------------------------------------------------------- predictions

def test_read_predictions_all_formats(tmp_path):
    ours = jsonl(tmp_path / "predictions.jsonl", [{"id": "1", "prediction": "A"},
                                                  {"id": "2", "prediction": "no"}])
    assert read_predictions(ours) == {"1": "A", "2": "no"}
    llava = jsonl(tmp_path / "answers.jsonl", [{"question_id": 3, "prompt": "p", "text": "Yes",
                                                "answer_id": "x", "model_id": "m"}])
    assert read_predictions(llava) == {"3": "Yes"}
    tsv = write_tsv(tmp_path / "model_MMBench.tsv", ["index", "question", "prediction"],
                    [[0, "q", "B"], [1000000, "q", "C) red"]])
    assert read_predictions(tsv) == {"0": "B", "1000000": "C) red"}
    csvf = tmp_path / "r.csv"
    csvf.write_text("index,prediction\n5,\"Yes, it is\"\n")
    assert read_predictions(csvf) == {"5": "Yes, it is"}
    vla = tmp_path / "sqa_pred.txt"
    vla.write_text("5 ||| 5/image.png ||| <s> Which?\\nOptions ||| B\\nbecause ||| B\n"
                   "11 ||| None ||| prompt ||| A ||| A\n")
    assert read_predictions(vla) == {"5": "B\nbecause", "11": "A"}


def test_read_predictions_xlsx(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("openpyxl")
    path = tmp_path / "r.xlsx"
    pd.DataFrame({"index": [1, 2], "prediction": ["A", "B"]}).to_excel(path, index=False)
    assert read_predictions(path) == {"1": "A", "2": "B"}


def test_read_predictions_errors(tmp_path):
    dup = jsonl(tmp_path / "p.jsonl", [{"id": "1", "prediction": "A"},
                                       {"id": "1", "prediction": "B"}])
    raises(lambda: read_predictions(dup), dup, "record 1", "field 'id'", "duplicate id")
    bad = jsonl(tmp_path / "q.jsonl", [{"id": "1", "prediction": None}])
    raises(lambda: read_predictions(bad), bad, "record 0", "field 'prediction'", "string")
    tsv = write_tsv(tmp_path / "r.tsv", ["index", "answer"], [[0, "A"]])
    raises(lambda: read_predictions(tsv), tsv, "field 'prediction'", "missing column")


def test_layouts_are_described():
    assert set(LAYOUTS) == {"vlmevalkit_tsv", "hf", "llava_jsonl", "pope", "mme_dir",
                            "scienceqa_json", "hallusionbench_json"}
    assert all(isinstance(v, str) and v for v in LAYOUTS.values())
