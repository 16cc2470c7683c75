"""InternVL specifics (the shared contract runs in test_families.py): tiles chosen by the image's
shape with the processor's own call defaults, each image's tiles encoded together, and the
image-only processor rebuilt on load."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmalign.models import adapter_for, build_tiny, load_adapter
from vlmalign.models.internvl import InternVLImageOnlyProcessor


@pytest.fixture(scope="module")
def ad():
    torch.manual_seed(0)
    model, processor = build_tiny("internvl")
    return adapter_for(model.eval(), processor)


# (width, height) -> tiles (+ a thumbnail when more than one); 4 features per 32x32 tile
@pytest.mark.parametrize("size,rows", [((64, 64), 5), ((96, 32), 4), ((32, 32), 1), ((20, 60), 4)])
def test_tiles_follow_the_processors_call(ad, size, rows):
    im = Image.new("RGB", size, "red")
    inp = ad.preprocess_image(im)
    assert ad.image_kwargs == {"crop_to_patches": True}   # the processor's call default, not the image processor's
    assert inp.tensors["pixel_values"].shape[0] == rows
    assert inp.num_features == 4 * rows and inp.num_tokens == 4 * rows + 2
    ref = ad.processor(text="<IMG_CONTEXT>\n", images=[im], return_tensors="pt", add_special_tokens=False)
    assert torch.equal(ref["pixel_values"], inp.tensors["pixel_values"])
    assert inp.expansion == ref["input_ids"][0, :inp.num_tokens].tolist()


def test_image_kwargs_turn_tiling_off(ad):
    saved = dict(ad.image_kwargs)
    ad.image_kwargs["crop_to_patches"] = False
    try:
        assert ad.preprocess_image(Image.new("RGB", (64, 64), "red")).num_features == 4
    finally:
        ad.image_kwargs.clear()
        ad.image_kwargs.update(saved)


def test_reload_rebuilds_the_image_only_processor(ad, tmp_path):
    ad.save_pretrained(str(tmp_path))
    ad2 = load_adapter(str(tmp_path))
    assert isinstance(ad2.processor, InternVLImageOnlyProcessor)
    assert ad2.processor.image_seq_length == ad.processor.image_seq_length == 4
    assert ad2.image_kwargs == ad.image_kwargs
    im = Image.new("RGB", (96, 32), "blue")
    a, b = ad.preprocess_image(im), ad2.preprocess_image(im)
    assert a.expansion == b.expansion and torch.equal(a.tensors["pixel_values"], b.tensors["pixel_values"])
