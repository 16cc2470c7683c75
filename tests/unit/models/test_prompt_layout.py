"""A model directory says where its training prompts put their images; prompts follow it."""

from __future__ import annotations

import json

import pytest

from vlmalign.data.schema import Conversation, ImagePart, ImageRef, Message, RLPrompt, TextPart
from vlmalign.errors import ModelError
from vlmalign.models.prompt_layout import (LAYOUT_FILE, detect_layout, model_image_position, place_images,
                                           place_records, read_layout, write_layout)

IMG = ImageRef(path="a.png")


def _conv(*parts):
    return Conversation([Message.user(*parts), Message.assistant("red")])


def test_the_position_of_the_first_user_turns_images_is_counted():
    recs = [_conv(IMG, "What colour?"), _conv("What colour?", IMG), _conv("What colour?\n", IMG),
            _conv("Left", IMG, "or right?"), Conversation([Message.user("no image"), Message.assistant("ok")])]
    layout = detect_layout(recs)
    assert layout == {"image_position": "after", "counts": {"before": 1, "after": 2, "inside": 1}}
    assert detect_layout([recs[-1]]) is None
    assert detect_layout([RLPrompt([Message.user(IMG, IMG, "q")], "x")])["image_position"] == "before"


def test_a_layout_is_written_and_read_back(tmp_path):
    write_layout(tmp_path, {"image_position": "after", "counts": {"before": 0, "after": 3, "inside": 0}})
    assert read_layout(tmp_path)["image_position"] == "after"
    assert model_image_position(tmp_path) == "after"
    write_layout(tmp_path / "nothing", None)  # no images seen: nothing written
    assert read_layout(tmp_path / "nothing") is None and model_image_position(tmp_path / "nothing") == "before"


@pytest.mark.parametrize("content,needle", [("{", "not a prompt layout"), ('{"x": 1}', "not a prompt layout"),
                                            ('{"image_position": "left"}', "must be before, after or inside")])
def test_a_broken_layout_file_is_named(tmp_path, content, needle):
    (tmp_path / LAYOUT_FILE).write_text(content)
    with pytest.raises(ModelError, match=needle) as e:
        read_layout(tmp_path)
    assert str(tmp_path / LAYOUT_FILE) in str(e.value)


def test_images_move_before_or_after_the_text_keeping_their_order():
    b = ImageRef(path="b.png")
    m = Message.user("Compare", IMG, "and", b)
    after = place_images(m, "after")
    assert [type(p) for p in after.content] == [TextPart, TextPart, ImagePart, ImagePart]
    assert [p.image for p in after.content[2:]] == [IMG, b]
    before = place_images(m, "before")
    assert [p.image for p in before.content[:2]] == [IMG, b] and before.text == "Compareand"


def test_records_follow_the_model_or_are_warned_about(tmp_path):
    recs = [RLPrompt([Message.user(IMG, "Where is the square?")], "left")] * 3
    write_layout(tmp_path, {"image_position": "after", "counts": {"before": 0, "after": 9, "inside": 0}})
    kept, note = place_records(recs, tmp_path, "data")
    assert kept == recs and "3 of 3 prompts do not put their images after" in note and "--image-position" in note
    moved, note = place_records(recs, tmp_path, "model")
    assert note is None and all(isinstance(r.prompt[0].content[-1], ImagePart) for r in moved)
    assert place_records(moved, tmp_path, "data")[1] is None
    with pytest.raises(ModelError, match="needs the model's"):
        place_records(recs, tmp_path / "elsewhere", "model")
    assert json.loads((tmp_path / LAYOUT_FILE).read_text())["counts"]["after"] == 9
