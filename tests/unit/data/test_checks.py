"""What `data validate` and `data stats` check beyond single records: options that need each
other, duplicate record ids, images in stats."""

from __future__ import annotations

import json

import pytest
from data_helpers import draw, dump

from vlmalign.cli.main import main
from vlmalign.data import compute_stats, validate_file
from vlmalign.errors import VlmalignError


def vqa(i, image="a.png", id=None):
    rec = {"image": image, "question": f"Q{i}?", "answer": "A"}
    if id is not None:
        rec["id"] = id
    return rec


def test_max_length_without_model_is_refused(tmp_path, capsys):
    path = dump(tmp_path / "d.json", [vqa(0, image=None)])
    with pytest.raises(VlmalignError, match="max_length needs a model"):
        validate_file(path, max_length=10)
    assert main(["data", "validate", str(path), "--max-length", "10"]) == 2
    err = capsys.readouterr().err
    assert "--max-length needs --model" in err and "tokenizer" in err


def test_duplicate_ids_are_reported(tmp_path, capsys):
    draw(tmp_path / "a.png")
    path = dump(tmp_path / "d.json", [vqa(0, id="x"), vqa(1, id="y"), vqa(2), vqa(3, id="x"),
                                      vqa(4), vqa(5, id="x")])
    report = validate_file(path)
    assert report.bad_indices == [3, 5]
    assert [(p.index, p.field, p.reason) for p in report.problems] == [
        (3, "id", "duplicate id 'x' (also record 0)"),
        (5, "id", "duplicate id 'x' (also record 0)")]
    assert main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: record 3: field 'id': duplicate id 'x' (also record 0)"
    assert out[-1] == "6 records, 2 bad"
    s = compute_stats(path)
    assert (s["records"], s["duplicate_ids"], s["bad_records"]) == (6, 2, 0)
    assert main(["data", "stats", str(path)]) == 0
    assert "duplicate ids: 2" in capsys.readouterr().out


def test_stats_check_images(tmp_path, capsys):
    draw(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = dump(tmp_path / "d.json", [vqa(0), vqa(1, "gone.png"), vqa(2, "broken.png"),
                                      {"question": 5}])
    s = compute_stats(path)
    assert (s["records"], s["bad_records"], s["images_checked"]) == (3, 3, True)
    assert s["distinct_images"] == 3 and s["turns"]["max"] == 1  # still described
    assert compute_stats(path, check_images=False)["bad_records"] == 1
    assert main(["data", "stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert "bad records: 3 (first: " in out and "record 1: field 'images[0]'" in out
    assert main(["data", "stats", str(path), "--no-images", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["bad_records"], data["images_checked"]) == (1, False)
    assert main(["data", "stats", str(path), "--no-images"]) == 0
    assert "bad records: 1 (images not checked; first: " in capsys.readouterr().out


def test_model_without_max_length_is_refused_before_loading(tmp_path, capsys):
    path = dump(tmp_path / "d.json", [vqa(0, image=None)])
    assert main(["data", "validate", str(path), "--model", str(tmp_path / "no-such-model")]) == 2
    assert "--model needs --max-length" in capsys.readouterr().err


def test_length_check_uses_the_adapter_the_caller_passes(tmp_path):
    """validate_file loads no model itself: the caller hands in anything with check_length."""
    from vlmalign.errors import LengthError

    draw(tmp_path / "a.png")
    path = dump(tmp_path / "d.json", [vqa(0), vqa(1)])
    seen = []

    class Lengths:
        def check_length(self, rec, images, max_length):
            seen.append((rec.index, len(images), max_length))
            if rec.index == 1:
                raise LengthError("is 99 tokens, over max_length 10")

    report = validate_file(path, adapter=Lengths(), max_length=10)
    assert seen == [(0, 1, 10), (1, 1, 10)]
    assert [(p.index, p.field, p.reason) for p in report.problems] == [
        (1, "length", "is 99 tokens, over max_length 10")]
