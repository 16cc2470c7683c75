"""Reader variants written by the tests themselves: LLaVA, PaddleMIX, plain_dpo, VQA, native."""

from __future__ import annotations

import pytest
from data_helpers import dump

from vlmalign.data import detect_format, iter_records, read_file
from vlmalign.data.placeholders import join_parts, split_text, Slot
from vlmalign.data.schema import (Conversation, ImagePart, ImageRef, PreferencePair, RankedList,
                                  RLPrompt, TextPart, UnpairedExample)
from vlmalign.errors import DataError


def img(path):
    return ImagePart(ImageRef(path=path))


def llava(tmp_path, *records, name="d.json", lines=False):
    return dump(tmp_path / name, list(records), lines=lines)


def conv(*turns):
    return [{"from": r, "value": v} for r, v in turns]


def error_of(path, **kw) -> DataError:
    with pytest.raises(DataError) as e:
        read_file(path, **kw)
    return e.value


# ---------------------------------------------------------------- placeholders

@pytest.mark.parametrize("text, segs", [
    ("<image>\nWhat?", [Slot(), "What?"]),
    ("What?\n<image>", ["What?", Slot()]),
    ("Look at <image> and answer", ["Look at ", Slot(), " and answer"]),
    ("A\n<image>\nB", ["A", Slot(), "B"]),
    ("<image><image>x", [Slot(), Slot(), "x"]),
    ("<image>\n<image>\nx", [Slot(), Slot(), "x"]),
    ("a\n\n<image>", ["a\n", Slot()]),
    ("no image", ["no image"]),
])
def test_split_text(text, segs):
    assert split_text(text) == segs


@pytest.mark.parametrize("parts", [
    [img("a"), TextPart("What?")],
    [TextPart("Where?"), img("a")],
    [TextPart("Look at "), img("a"), TextPart(" and")],
    [TextPart("a\n"), img("a"), TextPart("\nb")],
    [img("a"), img("b"), TextPart("x")],
    [img("a"), TextPart(" "), img("b")],
    [img("a"), TextPart("\n"), img("b")],
])
def test_join_then_split_is_identity(parts):
    from vlmalign.data.placeholders import place_images
    text = join_parts(parts)
    images = [p.image for p in parts if isinstance(p, ImagePart)]
    [msg] = place_images([("user", split_text(text))], images, lambda r: AssertionError(r))
    assert msg.content == parts


# ---------------------------------------------------------------- LLaVA

def test_llava_placeholder_positions_and_image_forms(tmp_path):
    path = llava(
        tmp_path,
        {"id": 1, "image": "a.jpg", "conversations": conv(
            ("human", "Look at this <image> and tell me the colour."), ("gpt", "Red."))},
        {"id": "list", "image": ["a.jpg", "b.jpg"], "conversations": conv(
            ("human", "First <image> then\n<image>\nsame?"), ("gpt", "No."))},
        {"id": "comma", "image": "a.jpg, b.jpg", "conversations": conv(
            ("human", "Compare."), ("gpt", "Both blue."))},
        {"id": "images-key", "images": ["c.jpg"], "conversations": conv(
            ("Human", "<image>Describe."), ("GPT", "A cat."))},
        {"id": "roles", "conversations": [
            {"from": "system", "value": "Be brief."}, {"from": "user", "value": "Hi"},
            {"from": "assistant", "value": "Hello."}, {"role": "user", "content": "Bye"}]},
    )
    r0, r1, r2, r3, r4 = read_file(path)
    assert r0.id == "1"
    assert r0.messages[0].content == [TextPart("Look at this "), img("a.jpg"),
                                      TextPart(" and tell me the colour.")]
    assert r1.messages[0].content == [TextPart("First "), img("a.jpg"), TextPart(" then"),
                                      img("b.jpg"), TextPart("same?")]
    # no placeholder, two images: both at the start of the first human turn, in order
    assert r2.messages[0].content == [img("a.jpg"), img("b.jpg"), TextPart("Compare.")]
    assert r3.messages[0].content == [img("c.jpg"), TextPart("Describe.")]
    assert [m.role for m in r4.messages] == ["system", "user", "assistant", "user"]
    assert r4.images == []


def test_llava_jsonl_and_meta(tmp_path):
    path = llava(tmp_path,
                 {"id": "x", "image": "a.jpg", "source_ds": "coco", "conversations": conv(
                     ("human", "<image>\nQ"), ("gpt", "A"))},
                 {"conversations": conv(("human", "Q2"), ("gpt", "A2"))},
                 name="d.jsonl", lines=True)
    assert detect_format(path) == "llava"
    r0, r1 = read_file(path)
    assert r0.meta == {"source_ds": "coco"} and (r0.index, r1.index) == (0, 1)
    assert r1.id is None and r1.messages[1].text == "A2"


def test_llava_ranked_two_and_three(tmp_path):
    path = llava(
        tmp_path,
        {"id": "r2", "image": "a.jpg", "conversations": conv(
            ("human", "<image>\nQ"), ("gpt", ["good", "bad"]))},
        {"id": "r3", "image": "a.jpg", "scores": [3, 2, 1.5], "conversations": conv(
            ("human", "<image>\nQ"), ("gpt", "A"), ("human", "More?"),
            ("gpt", ["best", "mid", "worst"]))},
    )
    r2, r3 = read_file(path)
    assert isinstance(r2, RankedList) and r2.responses == ["good", "bad"] and r2.scores is None
    assert isinstance(r3, RankedList) and r3.responses == ["best", "mid", "worst"]
    assert r3.scores == [3.0, 2.0, 1.5]
    assert [(m.role, m.text) for m in r3.prompt] == [("user", "Q"), ("assistant", "A"),
                                                     ("user", "More?")]
    items = dict(iter_records(path, kind="preference"))
    assert isinstance(items[0], PreferencePair) and (items[0].chosen, items[0].rejected) == (
        "good", "bad")
    assert isinstance(items[1], DataError) and "3 responses" in items[1].reason
    best = read_file(path, kind="conversation")[1]
    assert best.messages[-1].text == "best"


@pytest.mark.parametrize("record, field, reason", [
    ({"conversations": conv(("human", "Q"), ("bot", "A"))},
     "conversations[1].from", "unknown role 'bot'"),
    ({"image": "a.jpg", "conversations": conv(("human", "<image> <image> Q"), ("gpt", "A"))},
     "image", "placeholder count 2 differs from image count 1"),
    ({"conversations": conv(("human", "<image> Q"), ("gpt", "A"))},
     "image", "placeholder count 1 differs from image count 0"),
    ({"image": "a.jpg", "conversations": conv(("human", "<image> Q"), ("gpt", ""))},
     "conversations[1].value", "empty or missing response"),
    ({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>"},
                                          {"from": "gpt"}]},
     "conversations[1].value", "empty or missing response"),
    ({"conversations": conv(("human", "Q"), ("gpt", ["a", "b"]), ("human", "Q2"),
                            ("gpt", "c"))},
     "conversations[1].value", "only the last gpt turn may hold a list"),
    ({"conversations": []}, "conversations", "empty conversation"),
    ({"image": "a.jpg"}, "conversations", "missing field"),
    ({"conversations": conv(("human", "Q"), ("gpt", ["only one"]))},
     "responses", "two or more responses"),
    ({"conversations": conv(("human", "Q"), ("human", "Q again"))},
     "messages", "no assistant turn"),
    ({"conversations": conv(("human", "Q"), ("gpt", 42))},
     "conversations[1].value", "response must be a string"),
    ({"image": ["a.jpg", None], "conversations": conv(("human", "Q"), ("gpt", "A"))},
     "image[1]", "null image"),
    ({"image": "a.jpg", "images": ["b.jpg"], "conversations": conv(("human", "Q"),
                                                                   ("gpt", "A"))},
     "images", "both 'image' and 'images'"),
])
def test_llava_malformed(tmp_path, record, field, reason):
    good = {"conversations": conv(("human", "ok"), ("gpt", "ok"))}
    path = llava(tmp_path, good, good, good, record, name="demo.json")
    err = error_of(path)
    assert (err.file, err.index, err.field) == (str(path), 3, field)
    assert reason in err.reason
    assert str(err).startswith(f"{path}: record 3: field '{field}': ")


def test_error_message_format(tmp_path):
    good = {"conversations": conv(("human", "ok"), ("gpt", "ok"))}
    bad = {"conversations": conv(("human", "Q"), ("bot", "A"))}
    path = llava(tmp_path, good, good, good, bad, name="demo.json")
    err = error_of(path)
    assert str(err) == (f"{path}: record 3: field 'conversations[1].from': unknown role 'bot' "
                        "(expected one of human, gpt, user, assistant, system)")


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"conversations": []},\n {"image": "a.jpg",,}\n]\n')
    err = error_of(path)
    assert err.file == str(path) and err.index is None
    assert "invalid JSON at line 3, column 20" in str(err)


def test_invalid_jsonl_line_is_a_record_error(tmp_path):
    path = tmp_path / "d.jsonl"
    ok = '{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}'
    path.write_text(ok + "\n\n" + '{"conversations": [}\n' + ok + "\n")
    items = list(iter_records(path))
    assert [i for i, _ in items] == [0, 1, 2]
    assert isinstance(items[0][1], Conversation) and isinstance(items[2][1], Conversation)
    err = items[1][1]
    assert isinstance(err, DataError) and err.index == 1
    assert "invalid JSON on line 3" in err.reason


def test_json_container_variants(tmp_path):
    rec = {"conversations": conv(("human", "Q"), ("gpt", "A"))}
    wrapped = dump(tmp_path / "w.json", {"data": [rec, rec]})
    assert len(read_file(wrapped)) == 2
    as_lines = tmp_path / "lines.json"  # JSON Lines saved as .json
    as_lines.write_text(f'{{"conversations": {rec["conversations"]!r}}}\n'.replace("'", '"') * 2)
    assert len(read_file(as_lines)) == 2
    scalar = dump(tmp_path / "s.json", 5)
    assert "expected a JSON list of records" in str(error_of(scalar))
    not_obj = dump(tmp_path / "n.json", [rec, ["x"]])
    err = error_of(not_obj, format="llava")
    assert err.index == 1 and "expected a JSON object, got a list" in err.reason
    unknown = dump(tmp_path / "u.json", [{"foo": 1}])
    assert "cannot detect the format" in str(error_of(unknown))
    assert "no such file" in str(error_of(tmp_path / "missing.json"))


# ---------------------------------------------------------------- PaddleMIX

def test_paddlemix_variants_and_errors(tmp_path):
    path = dump(tmp_path / "p.json", [
        {"image": "a.jpg", "conversations": [["Q without placeholder", "A"]]},
        {"conversations": [["text only", "A"], ["again", "B"]]},
        {"image": "a.jpg", "conversations": [["<image>\nQ", "A", "extra"]]},
        {"image": "a.jpg", "conversations": [["<image>\nQ", ""]]},
    ])
    items = dict(iter_records(path, format="paddlemix"))
    assert items[0].messages[0].content == [img("a.jpg"), TextPart("Q without placeholder")]
    assert [m.text for m in items[1].messages] == ["text only", "A", "again", "B"]
    assert (items[2].field, items[2].reason) == (
        "conversations[0]", "expected a [user, assistant] pair, got 3 items")
    assert (items[3].field, items[3].reason) == ("conversations[0][1]",
                                                 "empty or missing response")


# ---------------------------------------------------------------- plain_dpo

def test_plain_dpo_variants(tmp_path):
    path = dump(tmp_path / "dpo.json", [
        {"image": "a.jpg", "prompt": "Describe <image> briefly.", "chosen": "c", "rejected": "r"},
        {"image": "a.jpg", "prompt": "Describe.", "chosen": "c", "rejected": "r",
         "rejected_image": "a_noisy.jpg", "source": "rlhf-v"},
        {"question": "Text only?", "chosen": "yes", "rejected": "no"},
        {"image": "a.jpg", "prompt": "Q", "chosen": "c", "rejected": " "},
        {"image": "a.jpg", "prompt": "Q", "chosen": "c", "rejected": "r",
         "rejected_images": ["x.jpg", "y.jpg"]},
    ])
    items = dict(iter_records(path))
    assert items[0].prompt[0].content == [TextPart("Describe "), img("a.jpg"),
                                          TextPart(" briefly.")]
    assert items[1].rejected_images == [ImageRef(path="a_noisy.jpg")]
    assert items[1].meta == {"source": "rlhf-v"}
    assert items[2].images == [] and items[2].prompt[0].text == "Text only?"
    assert (items[3].field, items[3].reason) == ("rejected", "empty or missing response")
    assert items[4].field == "rejected_images" and "2 rejected-side images for 1" in items[4].reason


# ---------------------------------------------------------------- VQA

def test_vqa_aliases_meta_and_kinds(tmp_path):
    path = dump(tmp_path / "vqa.json", [
        {"question_id": 7, "image": "a.jpg", "text": "What colour?", "category": "conv"},
        {"image": "a.jpg", "question": "Q", "answers": ["yes", "no", "yes"],
         "question_type": "yes/no"},
        {"image": "a.jpg", "question": "Q", "answers": [{"answer": "2"}, {"answer": "3"}]},
        {"image": "a.jpg", "question": "Q", "answer": 2, "label": "a"},
    ])
    assert detect_format(path) == "vqa"
    items = dict(iter_records(path))
    r0 = items[0]
    assert isinstance(r0, RLPrompt) and (r0.id, r0.reference, r0.meta) == (
        "7", None, {"category": "conv"})
    assert r0.prompt[0].content == [img("a.jpg"), TextPart("What colour?")]
    r1 = items[1]
    assert r1.reference == "yes" and r1.meta == {"answers": ["yes", "no", "yes"],
                                                 "question_type": "yes/no"}
    assert items[2].field == "answers" and "no single most frequent answer" in items[2].reason
    assert items[3].reference == "2" and items[3].meta == {"label": "a"}
    convs = dict(iter_records(path, kind="conversation"))
    assert isinstance(convs[0], DataError) and "no reference answer" in convs[0].reason
    assert [(m.role, m.text) for m in convs[1].messages] == [("user", "Q"),
                                                             ("assistant", "yes")]


# ---------------------------------------------------------------- native

def test_native_every_kind(tmp_path):
    prompt = [{"role": "user", "content": [{"type": "image", "image": "a.jpg"},
                                           {"type": "text", "text": "Q"}]}]
    path = dump(tmp_path / "n.jsonl", [
        {"kind": "conversation", "id": "c", "meta": {"k": [1]},
         "messages": prompt + [{"role": "assistant", "content": [{"type": "text",
                                                                  "text": "A"}]}]},
        {"kind": "preference", "prompt": prompt, "chosen": "c", "rejected": "r",
         "rejected_images": ["b.jpg"]},
        {"kind": "ranked", "prompt": prompt, "responses": ["1", "2", "3"], "scores": [3, 2, 1]},
        {"kind": "unpaired", "prompt": prompt, "completion": "x", "label": False},
        {"kind": "rl_prompt", "prompt": prompt, "reference": "cat"},
        {"kind": "rl_prompt", "prompt": prompt, "refrence": "typo"},
        {"kind": "pair", "prompt": prompt},
        {"kind": "conversation", "messages": [{"role": "bot", "content": []}]},
    ], lines=True)
    assert detect_format(path) == "vlmalign"
    items = dict(iter_records(path))
    assert isinstance(items[0], Conversation) and items[0].meta == {"k": [1]}
    assert items[0].messages[0].content == [img("a.jpg"), TextPart("Q")]
    assert isinstance(items[1], PreferencePair) and items[1].rejected_images == [
        ImageRef(path="b.jpg")]
    assert isinstance(items[2], RankedList) and items[2].scores == [3.0, 2.0, 1.0]
    assert isinstance(items[3], UnpairedExample) and items[3].label is False
    assert isinstance(items[4], RLPrompt) and items[4].reference == "cat"
    assert "unknown field(s) ['refrence']" in items[5].reason
    assert items[6].field == "kind" and "unknown kind 'pair'" in items[6].reason
    assert items[7].field == "messages[0].role" and "unknown role 'bot'" in items[7].reason
