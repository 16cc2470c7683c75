"""Containers: bytes that are not UTF-8, JSON syntax messages, empty files, corrupt parquet
pages -- always a DataError naming file and line (a JSON Lines line is one bad record), never
a traceback."""

from __future__ import annotations

import json

import pytest
from data_helpers import dump

from vlmalign.cli.main import main
from vlmalign.data import iter_records, load_records, read_file, validate_file
from vlmalign.data.readers import NoRecordsError
from vlmalign.errors import DataError

# one record of each layout that reads from JSON text
LAYOUTS = {
    "vlmalign": {"kind": "rl_prompt", "prompt": [{"role": "user", "content": [
        {"type": "text", "text": "Q?"}]}]},
    "llava": {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
    "paddlemix": {"conversations": [["Q?", "A"]]},
    "plain_dpo": {"prompt": "Q?", "chosen": "A", "rejected": "B"},
    "vqa": {"question": "Q?", "answer": "A"},
    "trl": {"messages": [{"role": "user", "content": "Q?"},
                         {"role": "assistant", "content": "A"}]},
}


def with_bad_byte(obj) -> bytes:
    """``obj`` as JSON with one Latin-1 byte (0xe9, 'e acute') inside its first string."""
    text = json.dumps(obj)
    i = text.index('"', text.index(":") + 1) + 1
    return text[:i].encode() + b"caf\xe9 " + text[i:].encode()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bad_byte_in_a_jsonl_line_is_one_bad_record(tmp_path, layout, capsys):
    good = json.dumps(LAYOUTS[layout]).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([good, with_bad_byte(LAYOUTS[layout]), good]) + b"\n")
    items = list(iter_records(path))
    assert [i for i, r in items if isinstance(r, DataError)] == [1]
    err = items[1][1]
    assert (err.file, err.index) == (str(path), 1)
    assert "line 2" in err.reason and "not valid UTF-8" in err.reason and "0xe9" in err.reason
    assert validate_file(path, check_images=False).bad_indices == [1]
    loaded = load_records(path, on_error="skip", check_images=False)
    assert [r.index for r in loaded.records] == [0, 2] and loaded.skipped == 1
    assert main(["data", "validate", str(path), "--format", layout]) == 1
    assert capsys.readouterr().out.splitlines()[0].startswith(
        f"{path}: record 1: byte 0xe9 on line 2, column ")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bad_byte_in_a_json_file_names_offset_and_line(tmp_path, layout, capsys):
    good = json.dumps(LAYOUTS[layout]).encode()
    data = b"[\n" + good + b",\n" + with_bad_byte(LAYOUTS[layout]) + b"\n]\n"
    path = tmp_path / "d.json"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(DataError) as e:
        read_file(path)
    assert e.value.file == str(path)
    assert f"byte offset {offset}" in e.value.reason and "line 3" in e.value.reason
    assert main(["data", "validate", str(path)]) == 1
    assert f"byte offset {offset}" in capsys.readouterr().out


def test_utf16_file_says_so(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(json.dumps([LAYOUTS["vqa"]]).encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16.*save it as UTF-8"):
        read_file(path)


def test_byte_order_mark_is_still_accepted(tmp_path):
    for name, text in (("a.json", json.dumps([LAYOUTS["vqa"]])),
                       ("a.jsonl", json.dumps(LAYOUTS["vqa"]) + "\n")):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert len(read_file(path)) == 1


@pytest.mark.parametrize("line, words", [
    ('{"question": "a\tb"}', "Invalid control character here"),
    ('{"question": "unterminated}', "Unterminated string starting here"),
    ('{"question": "q",}', "Expecting property name"),
])
def test_json_syntax_messages_are_complete(tmp_path, line, words):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(LAYOUTS["vqa"]) + "\n" + line)  # last line: no line break
    err = list(iter_records(path))[1][1]
    assert isinstance(err, DataError) and err.reason.startswith("invalid JSON on line 2, column ")
    assert words in err.reason and not err.reason.endswith(" at")


@pytest.mark.parametrize("name, content", [
    ("empty.json", ""), ("blank.json", "  \n"), ("list.json", "[]"),
    ("wrapped.json", '{"data": []}'), ("empty.jsonl", ""), ("blank.jsonl", "\n\n"),
])
def test_file_without_records(tmp_path, name, content, capsys):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(NoRecordsError) as e:
        list(iter_records(path, format="vqa"))
    assert str(e.value) == f"{path}: no records"
    with pytest.raises(DataError, match="no records"):
        read_file(path)
    report = validate_file(path)
    assert not report.ok and report.problems[0].message == f"{path}: no records"
    with pytest.raises(DataError, match="no records"):
        load_records(path, on_error="skip")
    assert main(["data", "validate", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{path}: no records", "0 records, 0 bad"]


def test_file_of_bad_records_is_not_empty(tmp_path):
    path = dump(tmp_path / "d.json", [{"question": 3}])
    report = validate_file(path)
    assert (report.records, report.bad) == (1, 1) and not report.file_problems


def test_corrupt_parquet_pages_fail_the_file_clearly(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    n = 3000
    pq.write_table(pa.table({"question": [f"question {i} " * 20 for i in range(n)],
                             "answer": ["a"] * n}), path, row_group_size=1000)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 3000, 7):  # inside the data pages
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    report = validate_file(path)
    [problem] = report.file_problems
    assert problem.file == str(path) and "cannot read the records from record" in problem.reason
