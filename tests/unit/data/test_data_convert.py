"""`vlmalign data convert` and write_records: round trips for every format pair that can
hold the records, bytes images written as files by hash, clear errors otherwise."""

from __future__ import annotations

import hashlib

import pytest
from data_helpers import draw, dump, png_bytes, signature

from vlmalign.cli.main import main
from vlmalign.data import read_file, write_records
from vlmalign.data.schema import (Conversation, ImageRef, Message, PreferencePair, RankedList,
                                  RLPrompt, TextPart, UnpairedExample)
from vlmalign.errors import DataError

# sample file -> formats that can hold its records, and the kind to read them back as
SAMPLES = {
    "llava_sft.json": ["vlmalign", "llava", "trl"],
    "paddlemix_pairs.json": ["vlmalign", "llava", "trl"],
    "resonance/demo_sft.json": ["vlmalign", "llava", "trl"],
    "llava_ranked.json": ["vlmalign", "llava"],
    "resonance/demo_dpo.json": ["vlmalign", "llava", "plain_dpo", "trl"],
    "resonance/demo_eval_vqa.json": ["vlmalign", "vqa", "trl"],
}
CASES = [(name, fmt) for name, fmts in SAMPLES.items() for fmt in fmts]
SUFFIX = {"vlmalign": ".jsonl", "trl": ".parquet"}


def convert(src, out, fmt, *extra) -> int:
    return main(["data", "convert", str(src), str(out), "--to", fmt, *extra])


@pytest.mark.parametrize("name, fmt", CASES)
def test_sample_round_trip(formats_dir, sample_images, tmp_path, capsys, name, fmt):
    src = formats_dir / name
    original = read_file(src)
    out = tmp_path / ("out" + SUFFIX.get(fmt, ".json"))
    assert convert(src, out, fmt, "--image-root", str(sample_images)) == 0
    assert f"wrote {len(original)} records" in capsys.readouterr().out
    # pairs stored in llava are two-response ranked lists: read them back as pairs
    back = read_file(out, kind=original[0].kind)
    assert [signature(r, sample_images, tmp_path) for r in back] == \
           [signature(r, sample_images, tmp_path) for r in original]
    if fmt in ("vlmalign", "trl"):
        assert [r.index for r in back] == list(range(len(original)))


@pytest.mark.parametrize("name, fmt", [(n, f) for n, f in CASES if f not in ("trl", "vlmalign")
                                       and "trl" in SAMPLES[n]])
def test_trl_then_path_format_writes_images_by_hash(formats_dir, sample_images, tmp_path,
                                                   name, fmt):
    """X -> trl (bytes embedded) -> a path format: images land in OUT/images/<sha1>.<ext>."""
    src = formats_dir / name
    original = read_file(src)
    kind = original[0].kind
    mid = tmp_path / "mid" / "data.parquet"
    assert convert(src, mid, "trl", "--image-root", str(sample_images)) == 0
    out = tmp_path / "final" / "data.json"
    assert convert(mid, out, fmt) == 0
    back = read_file(out, kind=kind)
    for rec in back:
        for ref in rec.images:
            data = (out.parent / ref.path).read_bytes()
            assert ref.path == f"images/{hashlib.sha1(data).hexdigest()}.jpg"
    assert [signature(r, out.parent) for r in back] == \
           [signature(r, sample_images) for r in original]


def _every_kind(tmp_path):
    draw(tmp_path / "img" / "a.png", (255, 0, 0))
    draw(tmp_path / "img" / "b.png", (0, 255, 0))
    a, b = ImageRef(path="a.png"), ImageRef(path="b.png")
    q = Message.user(a, "Which colour is ", b, "?")
    return [
        Conversation([Message.system("Be brief."), q, Message.assistant("Red and green."),
                      Message.user("Sure?"), Message.assistant("Yes.")], id="c1",
                     meta={"split": "train", "n": 3}),
        PreferencePair([q], "Red and green.", "Blue.", rejected_images=[b, a], id="p1"),
        RankedList([q], ["best", "ok", "bad"], scores=[1.0, 0.5, -1.0], id="r1"),
        UnpairedExample([Message.user(a, "Colour?")], "red", False, meta={"q": "colour"}),
        RLPrompt([Message.user("Text-only question")], "42"),
        RLPrompt([Message.user(ImageRef(data=png_bytes((0, 0, 255))), "Colour?")], None),
    ]


def test_native_is_lossless_for_every_kind(tmp_path):
    recs = _every_kind(tmp_path)
    out = write_records(recs, tmp_path / "all.jsonl", "vlmalign", image_dir=tmp_path / "img")
    back = read_file(out)
    roots = (tmp_path / "img", tmp_path)
    assert [signature(r, *roots, meta=True) for r in back] == \
           [signature(r, *roots, meta=True) for r in recs]
    # the bytes image became a file named by its hash, referenced relative to the output
    path = back[-1].images[0].path
    assert path == "img/" + hashlib.sha1(png_bytes((0, 0, 255))).hexdigest() + ".png"
    # and a second hop through vlmalign gives identical text
    again = write_records(back, tmp_path / "again.jsonl", "vlmalign")
    assert again.read_text() == out.read_text()


@pytest.mark.parametrize("fmt, suffix", [("trl", ".parquet"), ("trl", ""), ("llava", ".json")])
def test_every_kind_through_other_formats(tmp_path, fmt, suffix):
    recs = _every_kind(tmp_path)
    holds = {"trl": {"conversation", "preference", "unpaired", "rl_prompt"},
             "llava": {"conversation", "ranked"}}[fmt]
    roots = (tmp_path / "img", tmp_path / "out")
    for rec in recs:
        if rec.kind not in holds or (fmt == "llava" and rec.kind == "preference"):
            continue
        out = tmp_path / "out" / f"{rec.kind}-{rec.id}{suffix}"
        write_records([rec], out, fmt, image_root=tmp_path / "img",
                      image_dir=tmp_path / "out" / "images")
        [back] = read_file(out)
        assert signature(back, *roots) == signature(rec, *roots)
        if fmt == "trl":
            assert back.meta == rec.meta


@pytest.mark.parametrize("kind, fmt, words", [
    ("unpaired", "llava", "llava cannot hold unpaired records"),
    ("rl_prompt", "llava", "llava cannot hold rl_prompt records"),
    ("preference", "llava", "llava cannot hold rejected-side images"),
    ("ranked", "trl", "trl has no ranked-list form"),
    ("conversation", "vqa", "vqa holds rl_prompt records only"),
    ("ranked", "plain_dpo", "plain_dpo holds preference pairs only"),
])
def test_format_cannot_hold_kind(tmp_path, kind, fmt, words):
    rec = next(r for r in _every_kind(tmp_path) if r.kind == kind)
    rec.source, rec.index = "in.json", 4
    with pytest.raises(DataError) as e:
        write_records([rec], tmp_path / "out.parquet", fmt, image_root=tmp_path / "img")
    assert words in str(e.value) and str(e.value).startswith("in.json: record 4: ")


def test_single_turn_formats_refuse_multi_turn_prompts(tmp_path):
    pair = PreferencePair([Message.system("s"), Message.user("q")], "c", "r")
    with pytest.raises(DataError, match="plain_dpo holds a prompt of exactly one user turn"):
        write_records([pair], tmp_path / "o.json", "plain_dpo")


def test_mixed_kinds_cannot_share_a_trl_file(tmp_path):
    recs = [r for r in _every_kind(tmp_path) if r.kind in ("conversation", "rl_prompt")]
    with pytest.raises(DataError, match="one record kind, got conversation, rl_prompt"):
        write_records(recs, tmp_path / "o.parquet", "trl", image_root=tmp_path / "img")


def test_bytes_need_an_image_dir_outside_convert(tmp_path):
    rec = RLPrompt([Message.user(ImageRef(data=png_bytes()), "q")])
    with pytest.raises(DataError, match="needs an image directory"):
        write_records([rec], tmp_path / "o.json", "vqa")


def test_literal_placeholder_text_is_refused(tmp_path):
    rec = Conversation([Message.user("what does <image> mean in LLaVA?"),
                        Message.assistant("a placeholder")])
    with pytest.raises(DataError, match="literal '<image>'"):
        write_records([rec], tmp_path / "o.json", "llava")


def test_convert_with_kind_and_skip(tmp_path, capsys):
    draw(tmp_path / "a.png")
    src = dump(tmp_path / "vqa.json", [
        {"image": "a.png", "question": "Colour?", "answer": "red", "question_type": "colour"},
        {"image": "a.png", "question": "Shape?"},  # no answer: cannot be a conversation
    ])
    out = tmp_path / "sft.json"
    assert convert(src, out, "llava", "--kind", "conversation", "--on-error", "skip") == 0
    text = capsys.readouterr().out
    assert "skipped: " in text and "record 1" in text and "no reference answer" in text
    assert "wrote 1 records (conversation)" in text and "skipped 1 bad records" in text
    [rec] = read_file(out)
    assert [(m.role, m.text) for m in rec.messages] == [("user", "Colour?"),
                                                        ("assistant", "red")]
    assert rec.meta == {"question_type": "colour"}
    # without --on-error skip the bad record stops the conversion (exit code 2, no output)
    assert convert(src, tmp_path / "sft2.json", "llava", "--kind", "conversation") == 2
    assert "record 1" in capsys.readouterr().err and not (tmp_path / "sft2.json").exists()


def test_convert_reports_missing_image_for_trl(tmp_path, capsys):
    src = dump(tmp_path / "d.json", [{"image": "gone.png", "question": "q", "answer": "a"}])
    assert convert(src, tmp_path / "o.parquet", "trl") == 2
    err = capsys.readouterr().err
    assert "record 0" in err and "gone.png" in err


def test_vqa_round_trip_keeps_meta_and_ids(tmp_path):
    draw(tmp_path / "a.png")
    src = dump(tmp_path / "vqa.json", [
        {"question_id": 3, "image": "a.png", "text": "Q <image> here", "answers": ["x", "x", "y"],
         "category": "c"}])
    out = write_records(read_file(src), tmp_path / "out.json", "vqa")
    [a], [b] = read_file(src), read_file(out)
    assert (b.id, b.reference, b.meta) == ("3", "x", {"category": "c",
                                                      "answers": ["x", "x", "y"]})
    assert b.prompt == a.prompt and b.prompt[0].content[0] == TextPart("Q ")
