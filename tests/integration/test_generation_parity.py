"""Greedy generation from images encoded once equals the model's own ``generate`` on the
processor's output (pixel values, and the family's extras: Gemma 3's token types, Qwen3-VL's
grids and M-RoPE), for prompts of different lengths left-padded into one batch."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.data.schema import ImageRef, Message
from vlmalign.models import adapter_for, build_tiny, to_hf_messages


def _img(colour: str, w: int = 64, h: int = 64) -> Image.Image:
    im = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(im).ellipse([4, 4, w // 2, h // 2], fill=colour)
    return im


@pytest.mark.parametrize("family", ["gemma3", "qwen3_vl", "internvl", "mllama"])
def test_generation_equals_the_models_own(family):
    torch.manual_seed(0)
    model, processor = build_tiny(family)
    ad = adapter_for(model.eval(), processor)
    pil = [_img("red"), _img("blue", 96, 32)]
    ims = [ad.preprocess_image(p) for p in pil]
    prompts = [[Message.user(ImageRef(path="a.png"), "What colour?")],
               [Message.user(ImageRef(path="b.png"), "What colour is the circle in the picture?")]]
    enc = ad.encode_images(ims)
    rows = [ad.tokenize_prompt(p, [im]).input_ids for p, im in zip(prompts, ims)]
    L = max(map(len, rows))
    pad = ad.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        out = ad.new_tokens(ad.generate(ids, mask, encoded=enc, image_indices=[[0], [1]], **kw), ids)
        for b, (p, im) in enumerate(zip(prompts, pil)):
            text = processor.apply_chat_template(to_hf_messages(p), tokenize=False, add_generation_prompt=True)
            ref = processor(text=text, images=[im], return_tensors="pt", add_special_tokens=False)
            assert ref["input_ids"][0].tolist() == rows[b]
            if hasattr(model.model, "rope_deltas"):
                model.model.rope_deltas = None
            own = model.generate(**ref, **kw)[:, ref["input_ids"].shape[1]:]
            assert out[b].tolist() == own[0].tolist()
