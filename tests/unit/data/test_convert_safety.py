"""`data convert` never overwrites its input, skips (counts, reports) records whose images
cannot be read under --on-error skip, and hints at --image-root only when none was given."""

from __future__ import annotations

import os

import pytest
from data_helpers import draw, dump

from vlmalign.cli.main import main
from vlmalign.data import read_file, write_records
from vlmalign.errors import DataError


def vqa(image):
    return {"image": image, "question": "Q?", "answer": "A"}


def convert(*args) -> int:
    return main(["data", "convert", *map(str, args)])


@pytest.mark.parametrize("fmt", ["vlmalign", "vqa"])
def test_convert_refuses_to_overwrite_its_input(tmp_path, fmt, capsys, monkeypatch):
    draw(tmp_path / "a.png")
    src = dump(tmp_path / "d.json", [vqa("a.png")])
    before = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    for out in (src, tmp_path / "." / "d.json", "d.json"):
        assert convert(src, out, "--to", fmt) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "is the input" in err
    os.symlink(src, tmp_path / "link.json")
    assert convert(tmp_path / "link.json", src, "--to", fmt) == 2
    assert "is the input" in capsys.readouterr().err
    assert src.read_bytes() == before
    recs = read_file(src)
    with pytest.raises(DataError, match="is the input"):  # the library checks record sources
        write_records(recs, src, fmt)
    assert src.read_bytes() == before


def test_convert_refuses_to_overwrite_an_input_directory(tmp_path, capsys):
    draw(tmp_path / "a.png")
    src = dump(tmp_path / "d.json", [vqa("a.png")])
    ds = tmp_path / "ds"
    assert convert(src, ds, "--to", "trl") == 0
    assert convert(ds, ds, "--to", "trl") == 2
    assert "is the input" in capsys.readouterr().err and len(read_file(ds)) == 1


def test_convert_skip_skips_image_errors(tmp_path, capsys):
    draw(tmp_path / "a.png")
    src = dump(tmp_path / "d.json", [vqa("a.png"), vqa("gone.png"), vqa("a.png")])
    out = tmp_path / "o.parquet"
    assert convert(src, out, "--to", "trl", "--on-error", "skip") == 0
    text = capsys.readouterr().out
    assert "skipped: " in text and "record 1" in text and "image file not found: 'gone.png'" in text
    assert "wrote 2 records (rl_prompt)" in text and "skipped 1 bad records" in text
    assert [r.index for r in read_file(out)] == [0, 1]
    skipped = []
    write_records(read_file(src), tmp_path / "o2.parquet", "trl", image_root=tmp_path,
                  skipped=skipped)
    assert [e.index for e in skipped] == [1]


def test_image_root_hint_only_without_a_root(tmp_path, capsys):
    src = dump(tmp_path / "d.json", [vqa("gone.png")])
    assert convert(src, tmp_path / "o.parquet", "--to", "trl") == 2
    err = capsys.readouterr().err
    assert "image file not found: 'gone.png'" in err and "pass --image-root" in err
    assert convert(src, tmp_path / "o.parquet", "--to", "trl", "--image-root", tmp_path) == 2
    err = capsys.readouterr().err
    assert "image file not found: 'gone.png'" in err and "image root" not in err.split("(looked")[0]
    assert "pass" not in err
    assert convert(src, tmp_path / "o.parquet", "--to", "trl", "--on-error", "skip") == 0
    out = capsys.readouterr().out
    assert out.count("pass --image-root") == 1
