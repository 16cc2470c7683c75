"""compute_stats and `vlmalign data stats` with exact values."""

from __future__ import annotations

import json

from data_helpers import draw, dump

from vlmalign.cli.main import main
from vlmalign.data import compute_stats


def test_llava_sample_stats(formats_dir, sample_images):
    s = compute_stats(formats_dir / "llava_sft.json", sample_images)
    assert s["records"] == 4 and s["bad_records"] == 0
    assert s["kinds"] == {"conversation": 4}
    assert s["images_per_record"] == {"min": 0, "mean": 1.0, "max": 2}  # 1, 1, 0, 2
    assert s["turns"] == {"min": 1, "mean": 1.25, "max": 2}  # 2, 1, 1, 1 user turns
    # responses: 12 + 37 + 42 + 7 + 48 characters
    assert s["response_chars"] == {"min": 7, "mean": 29.2, "max": 48}
    assert s["text_only_share"] == 0.25
    assert s["distinct_images"] == 4


def test_stats_cli(formats_dir, sample_images, capsys):
    path = formats_dir / "resonance" / "demo_dpo.json"
    assert main(["data", "stats", str(path), "--image-root", str(sample_images)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "records: 10 (preference: 10); bad records: 0"
    assert out[2] == "images per record: min 1, mean 1.0, max 1"
    assert "text-only records: 0.0%" in out and "distinct images: 10" in out
    assert main(["data", "stats", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["response_chars"]["min"] == len("I see cat in the image.")


class WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_stats_tokens_shared_images_and_bad_records(tmp_path):
    draw(tmp_path / "a.png")
    draw(tmp_path / "b.png")
    path = dump(tmp_path / "d.json", [
        {"image": "a.png", "prompt": "Q", "chosen": "one two three", "rejected": "one",
         "rejected_image": "b.png"},
        {"image": "./a.png", "prompt": "Q", "chosen": "a b", "rejected": "c d e f"},
        {"prompt": "Q", "chosen": "", "rejected": "x"},  # bad: empty response
    ])
    s = compute_stats(path, tmp_path, tokenizer=WordTokenizer())
    assert (s["records"], s["bad_records"]) == (2, 1)
    assert s["response_tokens"] == {"min": 1, "mean": 2.5, "max": 4}
    assert s["distinct_images"] == 2  # a.png twice (resolved under the root), b.png
    assert s["text_only_share"] == 0.0
