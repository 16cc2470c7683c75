"""validate_file, load_records and `vlmalign data validate` on broken files."""

from __future__ import annotations

import json
import logging

import pytest
from data_helpers import draw, dump

from vlmalign.cli.main import main
from vlmalign.data import load_records, validate_file
from vlmalign.errors import DataError, LengthError


def turn(role, value):
    return {"from": role, "value": value}


def good(image="ok.png", q="<image>\nWhat is it?", a="A square."):
    if not image:
        return {"conversations": [turn("human", q.replace("<image>\n", "")), turn("gpt", a)]}
    return {"image": image, "conversations": [turn("human", q), turn("gpt", a)]}


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "images"
    draw(root / "ok.png")
    (root / "x.jpg").write_bytes(b"this is not a jpeg at all")
    draw(tmp_path / "outside.png")
    return root


# (record, index of the bad record, field, words of the reason)
BROKEN = {
    "missing_image": (good("nope.png"), "images[0]", "image file not found: 'nope.png'"),
    "corrupt_image": (good("x.jpg"), "images[0]", "corrupt or unreadable image"),
    "escaping_path": (good("../outside.png"), "images[0]", "escapes the image root"),
    "unknown_role": ({"image": "ok.png", "conversations": [turn("human", "<image> Q"),
                                                           turn("bot", "A")]},
                     "conversations[1].from", "unknown role 'bot'"),
    "placeholder_mismatch": (good(q="<image> and <image>?"), "image",
                             "placeholder count 2 differs from image count 1"),
    "empty_response": (good(a="  "), "conversations[1].value", "empty or missing response"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_record_is_reported(tmp_path, root, case, capsys):
    record, field, reason = BROKEN[case]
    path = dump(tmp_path / f"{case}.json", [good(), good(), record, good(image=None)])
    report = validate_file(path, root)
    assert (report.records, report.bad, report.bad_indices) == (4, 1, [2])
    [p] = report.problems
    assert (p.index, p.field, p.file) == (2, field, str(path)) and reason in p.reason
    assert not report.ok

    rc = main(["data", "validate", str(path), "--image-root", str(root)])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert out[-1] == "4 records, 1 bad"
    assert len(out) == 2 and out[0].startswith(f"{path}: record 2: field '{field}': ")
    assert reason in out[0]

    with pytest.raises(DataError) as e:
        load_records(path, root)
    assert (e.value.index, e.value.field) == (2, field) and reason in e.value.reason


def test_invalid_json_file(tmp_path, root, capsys):
    path = tmp_path / "broken.json"
    path.write_text('[{"image": "ok.png", "conversations": [}]')
    report = validate_file(path, root)
    assert report.records == 0 and not report.ok
    assert "invalid JSON at line 1, column 40" in report.problems[0].message
    assert main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: invalid JSON at line 1" in out
    assert "0 records, 0 bad (the file could not be read completely)" in out
    with pytest.raises(DataError):
        load_records(path, root, on_error="skip")  # a file-level failure always raises


def test_invalid_jsonl_line_does_not_stop_the_check(tmp_path, root, capsys):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(good()), "{not json", json.dumps(good("missing.png")),
             json.dumps(good())]
    path.write_text("\n".join(lines) + "\n")
    report = validate_file(path, root)
    assert (report.records, report.bad_indices) == (4, [1, 2])
    assert main(["data", "validate", str(path), "--image-root", str(root), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert (data["records"], data["bad"], data["ok"]) == (4, 2, False)
    assert [(p["index"], p["field"]) for p in data["problems"]] == [(1, None), (2, "images[0]")]
    assert "invalid JSON on line 2" in data["problems"][0]["reason"]


def test_clean_file_exit_code_zero(tmp_path, root, capsys):
    path = dump(tmp_path / "ok.json", [good(), good(image=None)])
    assert main(["data", "validate", str(path), "--image-root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == "2 records, 0 bad"


def test_default_image_root_is_the_file_folder(tmp_path, root):
    path = dump(root / "inside.json", [good()])
    assert validate_file(path).ok


def test_rejected_side_images_are_checked(tmp_path, root):
    path = dump(tmp_path / "dpo.json", [
        {"image": "ok.png", "prompt": "Q", "chosen": "c", "rejected": "r",
         "rejected_image": "x.jpg"}])
    [p] = validate_file(path, root).problems
    assert (p.index, p.field) == (0, "rejected_images[0]") and "corrupt" in p.reason


def test_load_records_skip_counts_and_logs(tmp_path, root, caplog):
    path = dump(tmp_path / "mixed.json", [good(), good("nope.png"), good(a=""), good()])
    with caplog.at_level(logging.WARNING):
        loaded = load_records(path, root, on_error="skip")
    assert [r.index for r in loaded.records] == [0, 3]
    assert (loaded.skipped, loaded.total) == (2, 4)
    assert [p.index for p in loaded.problems] == [1, 2]
    assert "skipped 2 of 4 records" in caplog.text
    with pytest.raises(ValueError):
        load_records(path, root, on_error="ignore")


class FakeAdapter:
    """Stands in for vlmalign.models' adapter: a record fits if its text is short."""

    def __init__(self):
        self.calls = []

    def check_length(self, record, images, max_length):
        self.calls.append((record.index, len(images), max_length))
        n = sum(len(m.text) for m in record.messages) + 10 * len(images)
        if n > max_length:
            raise LengthError(f"needs {n} tokens, max_length is {max_length}")


def test_length_check_through_model_option(tmp_path, root, monkeypatch, capsys):
    import vlmalign.models as models

    adapter = FakeAdapter()
    monkeypatch.setattr(models, "load_adapter", lambda path, **kw: adapter)
    path = dump(tmp_path / "len.json", [good(a="short"), good(a="x" * 100), good("nope.png")])
    rc = main(["data", "validate", str(path), "--image-root", str(root),
               "--model", str(tmp_path), "--max-length", "50"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert adapter.calls == [(0, 1, 50), (1, 1, 50)]  # not called for the record without image
    assert out[0] == f"{path}: record 1: field 'length': needs 121 tokens, max_length is 50"
    assert out[1].startswith(f"{path}: record 2: field 'images[0]': image file not found")
    assert out[-1] == "3 records, 2 bad"


def test_model_needs_max_length(tmp_path, root, capsys):
    path = dump(tmp_path / "ok.json", [good()])
    assert main(["data", "validate", str(path), "--model", str(tmp_path)]) == 2
    assert "--max-length" in capsys.readouterr().err
