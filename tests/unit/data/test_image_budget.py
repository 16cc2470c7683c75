"""The pixel budget: images declaring more pixels than ``max_pixels`` are refused from their
header, before decoding, with a DataError naming file, record and field (skippable), and
PIL's own decompression-bomb warning or error never escapes."""

from __future__ import annotations

import struct
import warnings
import zlib

import pytest
from data_helpers import draw, dump

from vlmalign.cli.main import main
from vlmalign.data import compute_stats, load_records, validate_file
from vlmalign.data.batching import ImageLoader, prepare
from vlmalign.data.images import DEFAULT_MAX_PIXELS, load_image
from vlmalign.data.readers import read_file
from vlmalign.data.schema import ImageRef
from vlmalign.errors import DataError


def bomb(width: int, height: int) -> bytes:
    """A small PNG that declares ``width`` x ``height`` 1-bit pixels (the data is a stub:
    it must be refused before anything is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def record(image):
    return {"image": image, "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                              {"from": "gpt", "value": "A."}]}


@pytest.fixture
def bombs(tmp_path):
    (tmp_path / "huge.png").write_bytes(bomb(100_000, 100_000))   # PIL itself raises
    (tmp_path / "big.png").write_bytes(bomb(20_000, 20_000))      # PIL itself raises
    (tmp_path / "warn.png").write_bytes(bomb(12_000, 12_000))     # PIL only warns
    draw(tmp_path / "ok.png")
    return tmp_path


def no_pil_warnings(caught):
    return [w for w in caught if "decompression" in str(w.message).lower()
            or issubclass(w.category, ResourceWarning)] == []


def test_default_budget():
    assert DEFAULT_MAX_PIXELS == 8192 * 8192


@pytest.mark.parametrize("name, size", [("huge.png", "10,000,000,000 pixels"),  # PIL refuses
                                        ("big.png", "400,000,000 pixels"),       # PIL refuses
                                        ("warn.png", "12000x12000 = 144,000,000 pixels")])
def test_declared_size_over_the_budget_is_refused(bombs, name, size):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as e:
            load_image(ImageRef(path=name), bombs)
    assert no_pil_warnings(caught)
    msg = str(e.value)
    assert name in msg and size in msg and "max_pixels" in msg and e.value.field == "image"


def test_budget_is_a_keyword(bombs):
    assert load_image(ImageRef(path="ok.png"), bombs, max_pixels=64).size == (8, 8)
    with pytest.raises(DataError, match="8x8 = 64 pixels"):
        load_image(ImageRef(path="ok.png"), bombs, max_pixels=63)
    with pytest.raises(DataError, match="declares .*400,000,000 pixels"):  # bytes images too
        load_image(ImageRef(data=bomb(20_000, 20_000)))


def test_no_budget_still_reports_pils_limit_as_a_data_error(bombs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as e:
            load_image(ImageRef(path="huge.png"), bombs, max_pixels=None)
        with pytest.raises(DataError) as w:  # under PIL's error limit: no budget stops it, decoding the stub fails
            load_image(ImageRef(path="warn.png"), bombs, max_pixels=None)
    assert no_pil_warnings(caught)
    assert "huge.png" in str(e.value) and "PIL" in str(e.value) and "max_pixels" not in str(e.value)
    assert "corrupt or unreadable" in str(w.value) and "max_pixels" not in str(w.value)


def test_validate_reports_and_skip_skips_bombs(bombs, caplog, capsys):
    path = dump(bombs / "d.json", [record("ok.png"), record("huge.png"), record("big.png"),
                                   record("ok.png")])
    report = validate_file(path)
    assert report.bad_indices == [1, 2]
    assert [(p.index, p.field) for p in report.problems] == [(1, "images[0]"), (2, "images[0]")]
    with pytest.raises(DataError) as e:
        load_records(path)
    assert (e.value.file, e.value.index, e.value.field) == (str(path), 1, "images[0]")
    loaded = load_records(path, on_error="skip")
    assert ([r.index for r in loaded.records], loaded.skipped) == ([0, 3], 2)
    assert compute_stats(path)["bad_records"] == 2

    assert main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "record 1: field 'images[0]'" in out and out.strip().endswith("4 records, 2 bad")
    assert "(max_pixels)" in out                                          # refused by our budget
    assert main(["data", "validate", str(path), "--max-pixels", "63"]) == 1
    assert capsys.readouterr().out.strip().endswith("4 records, 4 bad")
    assert main(["data", "validate", str(path), "--max-pixels", "0"]) == 1  # 0: PIL's limit only
    out = capsys.readouterr().out
    assert out.strip().endswith("4 records, 2 bad") and "(max_pixels)" not in out and "PIL" in out


class Adapter:
    def preprocess_image(self, img):
        return img.size

    def image_prompt(self, messages):
        return None


def test_training_loader_refuses_and_skips_bombs(bombs):
    path = dump(bombs / "d.json", [record("ok.png"), record("big.png")])
    recs = read_file(path)
    loader = ImageLoader(Adapter(), bombs, max_pixels=DEFAULT_MAX_PIXELS)
    tokenize = lambda rec, imgs: {"input_ids": [1]}  # noqa: E731
    with pytest.raises(DataError) as e:
        prepare(recs, tokenize, loader)
    assert (e.value.file, e.value.index, e.value.field) == (str(path), 1, "image")
    examples, report = prepare(recs, tokenize, loader, on_error="skip")
    assert len(examples) == 1 and report.count == 1 and "400,000,000 pixels" in report.summary()
    small = ImageLoader(Adapter(), bombs, max_pixels=10)
    with pytest.raises(DataError, match="over the pixel budget"):
        small.inputs(ImageRef(path="ok.png"))
