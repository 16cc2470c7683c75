"""Hugging Face / TRL columns: parquet with embedded image bytes, save_to_disk directories,
JSON Lines, every TRL dataset type."""

from __future__ import annotations

import hashlib

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import draw, dump, png_bytes

from vlmalign.data import detect_format, iter_records, read_file, validate_file
from vlmalign.data.schema import (Conversation, ImagePart, ImageRef, PreferencePair, RLPrompt,
                                  TextPart, UnpairedExample)
from vlmalign.errors import DataError

RED, BLUE = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}


def answer(t):
    return [{"role": "assistant", "content": [text(t)]}]


def test_parquet_messages_with_embedded_bytes(tmp_path):
    rows = [
        {"messages": [user(text("Compare "), IMAGE, text(" and "), IMAGE),
                      {"role": "assistant", "content": [text("Red vs blue.")]}],
         "images": [{"bytes": RED, "path": "red.png"}, {"bytes": BLUE, "path": None}]},
        {"messages": [user(text("Text only")), {"role": "assistant", "content": [text("ok")]}],
         "images": []},
    ]
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert detect_format(path) == "trl"
    r0, r1 = read_file(path)
    assert isinstance(r0, Conversation) and (r0.source, r0.index) == (str(path), 0)
    assert r0.messages[0].content == [TextPart("Compare "), ImagePart(ImageRef(data=RED)),
                                      TextPart(" and "), ImagePart(ImageRef(data=BLUE))]
    assert r0.messages[1].text == "Red vs blue."
    assert r1.images == [] and r1.index == 1
    # bytes decode: validate finds nothing wrong
    assert validate_file(path).problems == []


def test_save_to_disk_dir_with_pil_images_and_preference(tmp_path):
    ds = datasets.Dataset.from_dict({
        "prompt": [[user(IMAGE, text("Which colour?"))], [user(text("No image here"))]],
        "chosen": [answer("Red."), answer("Fine.")],
        "rejected": [answer("Blue."), answer("Bad.")],
        "images": [[{"bytes": RED, "path": None}], []],
    }).cast_column("images", datasets.List(datasets.Image()))
    out = tmp_path / "prefs"
    ds.save_to_disk(str(out))
    assert detect_format(out) == "trl"
    p0, p1 = read_file(out)
    assert isinstance(p0, PreferencePair) and (p0.chosen, p0.rejected) == ("Red.", "Blue.")
    assert p0.prompt[0].content == [ImagePart(ImageRef(data=RED)), TextPart("Which colour?")]
    assert p1.images == [] and p1.prompt[0].text == "No image here"


def test_datasetdict_dir_asks_for_a_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["q"]}),
                               "test": datasets.Dataset.from_dict({"prompt": ["q"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as e:
        read_file(tmp_path / "dd")
    assert "DatasetDict" in str(e.value) and "'test', 'train'" in str(e.value)
    assert read_file(tmp_path / "dd" / "train")[0].prompt[0].text == "q"


def test_standard_string_columns_and_every_type(tmp_path):
    draw(tmp_path / "a.png")
    path = dump(tmp_path / "trl.jsonl", [
        # string prompt + images, no placeholder: image goes first
        {"prompt": "What is it?", "chosen": "A square.", "rejected": "A circle.",
         "images": ["a.png"]},
        # KTO
        {"prompt": [user(IMAGE, text("Colour?"))], "completion": answer("red"), "label": True,
         "images": ["a.png"]},
        {"prompt": "Colour?", "completion": "blue", "label": 0, "images": ["a.png"]},
        # prompt + completion: a conversation
        {"prompt": [{"role": "system", "content": "Be brief."}, user(text("Hi"))],
         "completion": [{"role": "assistant", "content": "Hello."}]},
        # prompt only, with a solution column (GRPO style) and extra columns
        {"prompt": [user(IMAGE, text("How many?"))], "image": "a.png", "solution": "3",
         "difficulty": 2},
        # implicit prompt: chosen/rejected are whole conversations
        {"chosen": [user(IMAGE, text("Q")), answer("good")[0]],
         "rejected": [user(IMAGE, text("Q")), answer("bad")[0]], "images": ["a.png"]},
        # <image> inside string content counts as a placeholder
        {"messages": [{"role": "user", "content": "Look: <image> what?"},
                      {"role": "assistant", "content": "A square."}], "images": ["a.png"]},
    ], lines=True)
    assert detect_format(path) == "plain_dpo"  # the first row has string columns
    recs = read_file(path, format="trl")
    a = ImageRef(path="a.png")
    assert isinstance(recs[0], PreferencePair)
    assert recs[0].prompt[0].content == [ImagePart(a), TextPart("What is it?")]
    assert isinstance(recs[1], UnpairedExample) and recs[1].label is True
    assert recs[1].completion == "red" and recs[1].images == [a]
    assert isinstance(recs[2], UnpairedExample) and recs[2].label is False
    assert isinstance(recs[3], Conversation)
    assert [(m.role, m.text) for m in recs[3].messages] == [
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")]
    assert isinstance(recs[4], RLPrompt) and recs[4].reference == "3"
    assert recs[4].meta == {"difficulty": 2} and recs[4].images == [a]
    assert isinstance(recs[5], PreferencePair) and (recs[5].chosen, recs[5].rejected) == (
        "good", "bad")
    assert recs[5].prompt[0].content == [ImagePart(a), TextPart("Q")]
    assert recs[6].messages[0].content == [TextPart("Look: "), ImagePart(a), TextPart(" what?")]
    # read as plain_dpo (auto-detected from row 0), row 0 gives the same pair
    first = next(iter_records(path))[1]
    assert (first.prompt, first.chosen, first.rejected) == (
        recs[0].prompt, recs[0].chosen, recs[0].rejected)


@pytest.mark.parametrize("row, field, reason", [
    ({"messages": [user(IMAGE, IMAGE, text("Q")), answer("A")[0]], "images": ["a.png"]},
     "images", "placeholder count 2 differs from image count 1"),
    ({"messages": [user({"type": "video"}), answer("A")[0]]},
     "messages[0].content[0].type", "unknown part type 'video'"),
    ({"messages": [{"role": "bot", "content": "Q"}, answer("A")[0]]},
     "messages[0].role", "unknown role 'bot'"),
    ({"prompt": "Q", "completion": "A", "label": "yes"}, "label", "label must be true or false"),
    ({"prompt": "Q", "chosen": answer(""), "rejected": answer("r")},
     "chosen", "empty or missing response"),
    ({"prompt": "Q", "chosen": [user(text("Q")), answer("c")[0]], "rejected": answer("r")},
     "chosen", "expected exactly one assistant message"),
    ({"prompt": "Q", "solution": "1", "answer": "2"}, "answer", "solution and answer differ"),
    ({"chosen": "c", "rejected": "r"}, "prompt", "missing field"),
])
def test_trl_malformed(tmp_path, row, field, reason):
    ok = {"messages": [user(text("Q")), answer("A")[0]]}
    path = dump(tmp_path / "bad.jsonl", [ok, row], lines=True)
    items = list(iter_records(path, format="trl"))
    assert isinstance(items[0][1], Conversation)
    err = items[1][1]
    assert isinstance(err, DataError), err
    assert (err.file, err.index, err.field) == (str(path), 1, field) and reason in err.reason


def test_folder_of_parquet_files(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.Table.from_pylist([{"prompt": f"q{i}{j}"} for j in range(2)]),
                       folder / f"train-{i:05d}.parquet")
    recs = read_file(folder)
    assert [(r.index, r.prompt[0].text) for r in recs] == [(0, "q00"), (1, "q01"), (2, "q10"),
                                                           (3, "q11")]


def test_image_bytes_keep_identity(tmp_path):
    rows = [{"prompt": "Q", "images": [{"bytes": RED, "path": "x/red.png"}]}]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    [rec] = read_file(path)
    assert rec.images[0].key() == "sha1:" + hashlib.sha1(RED).hexdigest()
