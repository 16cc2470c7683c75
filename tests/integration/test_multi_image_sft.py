"""SFT on tiny models over Vision-LLM-Alignment's multi-image layout (one ``<image>`` for a
record's comma-separated images): the placeholder becomes one image block per image (LLaVA),
both images are encoded and the step trains (LLaVA, and Llama 3.2 Vision, the family the
layout was made for); a per-sample cap stops the run naming the record."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmalign.config import load_config
from vlmalign.data.readers import read_file
from vlmalign.errors import DataError
from vlmalign.methods.sft import SFTConfig, train_sft
from vlmalign.models import load_adapter, save_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimg")
    for name, colour in (("1.jpg", (200, 30, 30)), ("2.jpg", (30, 30, 200))):
        (root / "coco").mkdir(exist_ok=True)
        Image.new("RGB", (24, 24), colour).save(root / "coco" / name)
    talk = [{"from": "human", "value": "<image>\nWhich one is red?"},
            {"from": "gpt", "value": "The first picture."}]
    data = root / "sft_samples_multi_image.json"
    data.write_text(json.dumps([{"id": str(i), "image": "coco/1.jpg,coco/2.jpg",
                                 "conversations": talk} for i in range(2)], indent=4))
    return root, data


@pytest.fixture(scope="module")
def setup(data):
    root, path = data
    save_tiny("llava", str(root / "model"))
    return root, path


def _cfg(root, data, out, *extra):
    return load_config(SFTConfig, None, [
        f"model.path={root / 'model'}", f"data.train_file={data}", "data.max_length=512",
        f"train.output_dir={out}", "train.max_steps=1", "train.batch_size=2",
        "train.progress=false", "optim.warmup_steps=0", *extra])


def test_one_placeholder_record_trains_with_both_images(setup, tmp_path):
    root, data = setup
    adapter = load_adapter(str(root / "model"))
    rec = read_file(data)[0]
    imgs = [adapter.preprocess_image(Image.open(root / "coco" / n).convert("RGB"))
            for n in ("1.jpg", "2.jpg")]
    ids = list(adapter.tokenize_record(rec, imgs, max_length=512).input_ids)
    # one image block per image, in a row at the placeholder (as the chat template writes two
    # images: a newline between them), before the question
    image_id = adapter.model.config.image_token_id
    runs, prev = [], None
    for i, t in enumerate(ids):
        if t == image_id and prev != image_id:
            runs.append([i, 0])
        if t == image_id:
            runs[-1][1] += 1
        prev = t
    assert [n for _, n in runs] == [len(imgs[0].expansion), len(imgs[1].expansion)]
    assert runs[1][0] - sum(runs[0]) == 1  # only the newline between the two blocks

    result, trained = train_sft(_cfg(root, data, tmp_path / "run"))
    assert result.step == 1
    assert trained.encoded_images >= 2  # both images of the record went through the tower


def test_cap_stops_the_run_naming_the_record(setup, tmp_path):
    root, data = setup
    with pytest.raises(DataError) as e:
        train_sft(_cfg(root, data, tmp_path / "capped", "data.max_images=1"))
    assert (e.value.file, e.value.index, e.value.field) == (str(data), 0, "images")
    assert "over the limit of 1 (max_images)" in e.value.reason


def test_one_placeholder_record_trains_on_tiny_mllama(data, tmp_path):
    root, path = data
    save_tiny("mllama", str(tmp_path / "model"))
    cfg = load_config(SFTConfig, None, [
        f"model.path={tmp_path / 'model'}", f"data.train_file={path}", "data.max_length=512",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.batch_size=2",
        "train.progress=false", "optim.warmup_steps=0"])
    result, trained = train_sft(cfg)
    assert result.step == 1 and trained.encoded_images >= 2
