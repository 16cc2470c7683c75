"""Every reader on the shared sample files, with exact expected records."""

from __future__ import annotations

import pytest

from vlmalign.data import detect_format, read_file, validate_file
from vlmalign.data.schema import (Conversation, ImagePart, ImageRef, PreferencePair, RankedList,
                                  RLPrompt, TextPart)
from vlmalign.errors import DataError


def img(path):
    return ImagePart(ImageRef(path=path))


@pytest.mark.parametrize("name, fmt", [
    ("llava_sft.json", "llava"), ("llava_ranked.json", "llava"),
    ("paddlemix_pairs.json", "paddlemix"), ("resonance/demo_sft.json", "llava"),
    ("resonance/demo_dpo.json", "plain_dpo"), ("resonance/demo_eval_vqa.json", "vqa")])
def test_detect_format(formats_dir, name, fmt):
    assert detect_format(formats_dir / name) == fmt


@pytest.mark.parametrize("name, n", [
    ("llava_sft.json", 4), ("llava_ranked.json", 2), ("paddlemix_pairs.json", 2),
    ("resonance/demo_sft.json", 15), ("resonance/demo_dpo.json", 10),
    ("resonance/demo_eval_vqa.json", 10)])
def test_samples_validate_clean_with_image_root(formats_dir, sample_images, name, n):
    report = validate_file(formats_dir / name, sample_images)
    assert (report.records, report.bad, report.problems) == (n, 0, [])


def test_llava_sft(formats_dir):
    path = formats_dir / "llava_sft.json"
    recs = read_file(path)
    assert [type(r) for r in recs] == [Conversation] * 4
    assert [(r.source, r.index, r.id) for r in recs] == [(str(path), i, f"a{i + 1}")
                                                         for i in range(4)]
    a1, a2, a3, a4 = recs
    # placeholder first, multi-turn
    assert [m.role for m in a1.messages] == ["user", "assistant", "user", "assistant"]
    assert a1.messages[0].content == [img("demo_01.jpg"), TextPart("What animal is this?")]
    assert a1.messages[2].content == [TextPart("What is it looking at?")]
    assert a1.messages[3].text == "It is looking straight at the camera."
    # placeholder at the end of the turn
    assert a2.messages[0].content == [TextPart("Where is the dog?"), img("demo_02.jpg")]
    # text-only
    assert a3.images == [] and a3.messages[0].content == [
        TextPart("Name a colour that is often seen at sunset.")]
    # comma-separated multi-image with two placeholders
    assert a4.messages[0].content == [img("demo_03.jpg"), img("demo_04.jpg"),
                                      TextPart("Which of the two pictures is brighter?")]


def test_llava_ranked(formats_dir):
    r1, r2 = read_file(formats_dir / "llava_ranked.json")
    assert isinstance(r1, RankedList) and isinstance(r2, RankedList)
    assert r1.responses == ["A cat looking at the camera.", "An animal.",
                            "A dog running in a park."]
    assert r1.prompt[0].content == [TextPart("What is in the picture?"), img("demo_01.jpg")]
    assert r2.responses == ["A detailed, accurate one-sentence description.",
                            "A vague description."]
    assert [(p.chosen, p.rejected) for p in r1.pairs()] == [
        ("A cat looking at the camera.", "An animal."),
        ("A cat looking at the camera.", "A dog running in a park."),
        ("An animal.", "A dog running in a park.")]


def test_llava_ranked_as_preference_needs_two_responses(formats_dir):
    path = formats_dir / "llava_ranked.json"
    with pytest.raises(DataError) as e:
        read_file(path, kind="preference")
    assert e.value.index == 0 and "3 responses" in str(e.value) and "pairs()" in str(e.value)
    from vlmalign.data import iter_records
    items = list(iter_records(path, kind="preference"))
    assert isinstance(items[0][1], DataError)
    pair = items[1][1]
    assert isinstance(pair, PreferencePair)
    assert (pair.chosen, pair.rejected, pair.index, pair.id) == (
        "A detailed, accurate one-sentence description.", "A vague description.", 1, "r2")


def test_paddlemix_pairs(formats_dir):
    r0, r1 = read_file(formats_dir / "paddlemix_pairs.json")
    assert [(m.role, m.text) for m in r0.messages] == [
        ("user", "What animal is shown?"), ("assistant", "A dog."),
        ("user", "Is it indoors?"), ("assistant", "No, it is outdoors on grass.")]
    assert r0.messages[0].content[0] == img("demo_02.jpg")
    assert r1.images == [ImageRef(path="demo_07.jpg")]


def test_resonance_sft_vlquery_json(formats_dir):
    recs = read_file(formats_dir / "resonance" / "demo_sft.json", format="vlquery_json")
    assert len(recs) == 15
    first = recs[0]
    # no placeholder in the file: the image goes first in the first user turn
    assert first.messages[0].content == [img("demo_01.jpg"),
                                         TextPart("What do you see in this image?")]
    assert first.messages[1].role == "assistant"
    assert first.messages[1].text.startswith("I can see a close-up photo of a domestic cat")
    assert [r.images[0].path for r in recs][-1] == "demo_10.jpg"


def test_resonance_plain_dpo(formats_dir):
    recs = read_file(formats_dir / "resonance" / "demo_dpo.json")
    assert len(recs) == 10 and all(isinstance(r, PreferencePair) for r in recs)
    p = recs[0]
    assert p.prompt[0].content == [img("demo_01.jpg"),
                                   TextPart("Describe what you see in this image of cat.")]
    assert p.rejected == "I see cat in the image."
    assert p.chosen.startswith("This image shows a close-up photo")
    assert p.rejected_images is None


def test_resonance_vqa(formats_dir):
    path = formats_dir / "resonance" / "demo_eval_vqa.json"
    recs = read_file(path)
    assert all(isinstance(r, RLPrompt) for r in recs)
    assert [r.reference for r in recs][:4] == ["cat", "park", "sunset", "urban city"]
    assert recs[0].prompt[0].content == [img("demo_01.jpg"),
                                         TextPart("What animal is shown in this image?")]
    convs = read_file(path, kind="conversation")
    assert [(m.role, m.text) for m in convs[1].messages] == [
        ("user", "Where is the dog located?"), ("assistant", "park")]


def test_kind_that_makes_no_sense(formats_dir):
    with pytest.raises(DataError) as e:
        read_file(formats_dir / "resonance" / "demo_eval_vqa.json", kind="preference")
    assert "rl_prompt record cannot be read as 'preference'" in str(e.value)
    assert e.value.index == 0
