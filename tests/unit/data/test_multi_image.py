"""Multi-image records as Vision-LLM-Alignment writes them for Llama-3.2-Vision SFT
(``data/sft_samples_multi_image.json``): LLaVA records whose ``image`` is a comma-separated
string of paths and whose conversation holds a single ``<image>`` for all of them. The llava
reader expands that placeholder to one per image, in order, and says so (validate, stats, the
training log); real mismatches stay refused. And the per-sample caps: ``max_images`` and
``max_sample_pixels``, refused with the file, record and limit named, never dropped silently."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from data_helpers import draw

from vlmalign.cli.main import main
from vlmalign.config.sections import DataSection
from vlmalign.data import compute_stats, load_records, validate_file
from vlmalign.data.loading import read_records
from vlmalign.data.readers import read_file
from vlmalign.data.schema import ImagePart, TextPart
from vlmalign.errors import DataError

A, B, C = ("coco/train2017/000000000101.jpg", "coco/train2017/000000000102.jpg",
           "coco/train2017/000000000103.jpg")


def talk(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


# Laid out as the public file is: a JSON list (4-space indent) of {"id", "image",
# "conversations"}; "image" a comma-separated string of COCO-style paths; one "<image>\n" at
# the start of the first human turn (or inside it) whatever the number of images; ids repeat.
RECORDS = [
    {"id": "000000000101", "image": f"{A},{B}",
     "conversations": talk("<image>\nWhich picture is brighter?", "The first one.",
                           "What colour is the second?", "It is blue.")},
    {"id": "000000000101", "image": f"{A},{A}",
     "conversations": talk("<image>\nAre the two pictures the same?", "Yes, they are identical.")},
    {"id": "000000000101", "image": A,
     "conversations": talk("<image>\nWhat colour is the picture?", "It is red.")},
    {"id": "000000000104", "image": B,
     "conversations": talk("Look at this photo: <image>\nwhat do you see?", "A blue square.",
                           "Anything else?", "Nothing else.")},
]


@pytest.fixture
def mimg(tmp_path) -> Path:
    """The fixture file with its images (drawn with PIL: 32x32 red, 32x32 blue, 64x64 green)."""
    draw(tmp_path / A, (255, 0, 0), (32, 32))
    draw(tmp_path / B, (0, 0, 255), (32, 32))
    draw(tmp_path / C, (0, 255, 0), (64, 64))
    path = tmp_path / "sft_samples_multi_image.json"
    path.write_text(json.dumps(RECORDS, indent=4))
    return path


def shape(msg):
    return [("image", p.image.path) if isinstance(p, ImagePart) else ("text", p.text)
            for p in msg.content]


def test_one_placeholder_reads_as_one_per_image_in_order(mimg):
    recs = read_file(mimg)
    assert len(recs) == 4
    assert [len(r.images) for r in recs] == [2, 2, 1, 1]
    assert [r.one_placeholder_for for r in recs] == [2, 2, None, None]
    assert shape(recs[0].messages[0]) == [("image", A), ("image", B),
                                          ("text", "Which picture is brighter?")]
    assert shape(recs[1].messages[0])[:2] == [("image", A), ("image", A)]
    # the turns after the first keep their text; one image per record stays as it was
    assert shape(recs[0].messages[2]) == [("text", "What colour is the second?")]
    assert shape(recs[3].messages[0]) == [("text", "Look at this photo: "), ("image", B),
                                          ("text", "what do you see?")]


def test_placeholder_inside_a_turn_takes_every_image_there(tmp_path):
    path = tmp_path / "mid.json"
    path.write_text(json.dumps([{"id": "x", "image": f"{A},{B},{C}", "conversations": talk(
        "Compare <image> closely.", "They differ.")}], indent=4))
    [rec] = read_file(path)
    assert rec.one_placeholder_for == 3
    assert shape(rec.messages[0]) == [("text", "Compare "), ("image", A), ("image", B),
                                      ("image", C), ("text", " closely.")]
    # read as an RL prompt, the record still says what its placeholder stood for
    [prompt] = read_file(path, kind="rl_prompt")
    assert prompt.one_placeholder_for == 3 and len(prompt.images) == 3


@pytest.mark.parametrize("image,text,reason", [
    (f"{A},{B},{C}", "<image> and <image>?", "placeholder count 2 differs from image count 3"),
    # the convention belongs to the comma-separated string; a JSON list needs one per image
    ([A, B], "<image>\nSame?", "placeholder count 1 differs from image count 2"),
])
def test_real_mismatches_are_still_refused(tmp_path, capsys, image, text, reason):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([RECORDS[2], {"id": "b", "image": image,
                                             "conversations": talk(text, "No.")}], indent=4))
    with pytest.raises(DataError) as e:
        read_file(path)
    assert (e.value.file, e.value.index, e.value.field) == (str(path), 1, "image")
    assert reason in e.value.reason
    assert main(["data", "validate", str(path), "--no-images"]) == 1
    out = capsys.readouterr().out
    assert f"{path}: record 1: field 'image': {reason}" in out


def test_validate_and_stats_count_the_convention(mimg, capsys):
    report = validate_file(mimg)
    assert [p.field for p in report.problems] == ["id", "id"]  # the file's repeated ids only
    assert report.one_placeholder == 2 and report.to_json()["one_placeholder"] == 2
    assert report.summary().endswith("2 with one <image> for several images")
    assert main(["data", "validate", str(mimg)]) == 1  # the duplicate ids
    out = capsys.readouterr().out
    assert "note: 2 records wrote one <image> for all of their images" in out
    assert "placeholder count" not in out

    s = compute_stats(mimg)
    assert s["one_placeholder_records"] == 2 and s["bad_records"] == 0
    assert s["images_per_record"] == {"min": 1, "mean": 1.5, "max": 2}
    assert main(["data", "stats", str(mimg)]) == 0
    assert "records with one <image> for several images (expanded): 2" in capsys.readouterr().out
    assert main(["data", "stats", str(mimg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["one_placeholder_records"] == 2


def test_training_reads_and_logs_the_convention(mimg, caplog):
    with caplog.at_level(logging.INFO, logger="vlmalign"):
        recs, rep = read_records(str(mimg), DataSection())
    assert len(recs) == 4 and rep.count == 0
    assert "2 records wrote one <image> for all of their images" in caplog.text


def test_converted_file_has_one_placeholder_per_image(mimg, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["data", "convert", str(mimg), str(out), "--to", "llava"]) == 0
    capsys.readouterr()
    again, before = read_file(out), read_file(mimg)
    assert [r.one_placeholder_for for r in again] == [None] * 4
    assert [[shape(m) for m in r.messages] for r in again] == \
        [[shape(m) for m in r.messages] for r in before]


# --- the per-sample caps -------------------------------------------------------------------

def test_max_images_refuses_naming_file_record_and_limit(mimg, capsys):
    report = validate_file(mimg, max_images=1)
    caps = [p for p in report.problems if p.field == "images"]
    assert [p.index for p in caps] == [0, 1]
    assert caps[0].message == (f"{mimg}: record 0: field 'images': 2 images in one sample, over "
                               "the limit of 1 (max_images); split the record or raise the limit")
    assert validate_file(mimg, max_images=2, check_images=False).bad == 2  # the ids only
    assert main(["data", "validate", str(mimg), "--max-images", "1", "--no-images"]) == 1
    assert "record 1: field 'images': 2 images in one sample" in capsys.readouterr().out
    assert compute_stats(mimg, max_images=1)["bad_records"] == 2


def test_max_sample_pixels_refuses_naming_the_budget(mimg, capsys):
    # records 0 and 1 hold 2 x 32 x 32 = 2048 pixels, records 2 and 3 1024
    assert not [p for p in validate_file(mimg, max_sample_pixels=2048).problems if p.field != "id"]
    report = validate_file(mimg, max_sample_pixels=2047)
    caps = [p for p in report.problems if p.field == "images"]
    assert [p.index for p in caps] == [0, 1]
    assert ("the sample's 2 images hold 2,048 pixels together (32x32 + 32x32), over the "
            "per-sample budget of 2,047 (max_sample_pixels)") in caps[0].message
    assert caps[0].message.startswith(f"{mimg}: record 0: field 'images': ")
    assert main(["data", "stats", str(mimg), "--max-sample-pixels", "2047", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bad_records"] == 2
    # the budget needs the image sizes
    assert main(["data", "validate", str(mimg), "--max-sample-pixels", "5", "--no-images"]) == 2
    assert "max_sample_pixels needs the images opened" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # out of the option's declared range
        main(["data", "validate", str(mimg), "--max-images", "0"])
    assert "--max-images: 0 is out of range (must be >= 1)" in capsys.readouterr().err


def test_training_caps_raise_or_skip_never_silently(mimg, caplog):
    with pytest.raises(DataError) as e:
        read_records(str(mimg), DataSection(max_images=1))
    assert (e.value.file, e.value.index, e.value.field) == (str(mimg), 0, "images")
    assert "over the limit of 1 (max_images)" in e.value.reason
    with pytest.raises(DataError, match="per-sample budget of 1,500"):
        read_records(str(mimg), DataSection(max_sample_pixels=1500))
    recs, rep = read_records(str(mimg), DataSection(max_sample_pixels=1500, on_error="skip"))
    assert [r.index for r in recs] == [2, 3]
    assert rep.count == 2 and "skipped 2 of 4 records" in rep.summary()
    # load_records (the library's checked reading) takes the same caps
    loaded = load_records(mimg, on_error="skip", max_images=1)
    assert loaded.skipped == 2 and [r.index for r in loaded.records] == [2, 3]
