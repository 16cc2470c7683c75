"""Gemma 3 specifics (the shared contract runs in test_families.py): the bidirectional image
blocks need ``token_type_ids``, which the adapter derives; the expansion is tokenized inside the
text (newline merges); pan-and-scan crops. Generation: test_generation_parity.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.data.schema import ImageRef, Message
from vlmalign.models import VLMAdapter, adapter_for, build_tiny
from vlmalign.models.gemma3 import GEMMA3_CHAT_TEMPLATE


def _img(colour: str, w: int = 64, h: int = 64) -> Image.Image:
    im = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(im).ellipse([4, 4, w // 2, h // 2], fill=colour)
    return im


@pytest.fixture(scope="module")
def ad():
    torch.manual_seed(0)
    model, processor = build_tiny("gemma3")
    return adapter_for(model, processor)


MSGS = [Message.system("Be brief."), Message.user(ImageRef(path="a.png"), "What colour?"), Message.assistant("red")]


def test_template_layout(ad):
    assert ad.render(MSGS) == ("<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>What colour?<end_of_turn>\n"
                               "<start_of_turn>model\nred<end_of_turn>\n")
    assert ad.render(MSGS[:2], add_generation_prompt=True).endswith("<end_of_turn>\n<start_of_turn>model\n")
    assert ad.processor.chat_template == GEMMA3_CHAT_TEMPLATE


def test_token_types_are_needed_and_derived(ad):
    """The processor's token_type_ids mark the soft tokens; the adapter derives the same ones, and
    a forward without them (causal image tokens) gives other logits than the model's own."""
    pil = [_img("red")]
    ims = [ad.preprocess_image(p) for p in pil]
    ref = ad.processor(text=ad.render(MSGS), images=pil, return_tensors="pt", add_special_tokens=False)
    ids = ref["input_ids"]
    assert torch.equal(ad.token_type_ids(ids), ref["token_type_ids"])
    assert int(ref["token_type_ids"].sum()) == ims[0].num_features == 4
    assert ims[0].num_tokens == 10   # \n\n <start_of_image> 4 x soft <end_of_image> \n\n (tiny: \n\n = 2 ids)
    enc = ad.encode_images(ims)
    with torch.no_grad():
        own = ad.model(**ref).logits
        ours = ad.forward(ids, torch.ones_like(ids), encoded=enc, image_indices=[[0]]).logits
        causal = ad.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=ref["pixel_values"]).logits
    assert (own - ours).abs().max().item() <= 1e-5
    assert (own - causal).abs().max().item() > 1e-3


def test_expansion_is_tokenized_inside_the_text():
    """With a tokenizer that merges newline runs (as Gemma's does), splicing the separately
    tokenized expansion gives other ids than the processor; the adapter's ids equal its."""
    model, processor = build_tiny("gemma3")
    processor.tokenizer.add_tokens(["\n\n\n", "\n\n"])
    ad = adapter_for(model, processor)
    pil = [_img("red")]
    ims = [ad.preprocess_image(p) for p in pil]
    msgs = MSGS[1:]
    ref = processor(text=ad.render(msgs), images=pil, return_tensors="pt", add_special_tokens=False)
    assert ad.tokenize_messages(msgs, ims).input_ids == ref["input_ids"][0].tolist()
    assert VLMAdapter.tokenize_messages(ad, msgs, ims).input_ids != ref["input_ids"][0].tolist()


def test_pan_and_scan_crops_encode_once(ad):
    """A wide image becomes the full view + crops, each its own soft-token block. Off by default,
    as in the processor's call; ``image_kwargs`` turns it on (the processor gets the same)."""
    assert ad.image_kwargs["do_pan_and_scan"] is False
    assert ad.preprocess_image(_img("red", 96, 32)).tensors["pixel_values"].shape[0] == 1
    pas = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=16, pan_and_scan_max_num_crops=4,
               pan_and_scan_min_ratio_to_activate=1.2)
    saved = dict(ad.image_kwargs)
    ad.image_kwargs.update(pas)
    try:
        pil = [_img("red", 96, 32), _img("blue")]
        ims = [ad.preprocess_image(p) for p in pil]
        assert ims[0].tensors["pixel_values"].shape[0] == 4 and ims[1].tensors["pixel_values"].shape[0] == 1
        assert ims[0].num_features == 16 and ims[1].num_features == 4
        msgs = [Message.user(ImageRef(path="a.png"), "Left?", ImageRef(path="b.png")), Message.assistant("red")]
        ref = ad.processor(text=ad.render(msgs), images=pil, return_tensors="pt", add_special_tokens=False, **pas)
        tk = ad.tokenize_messages(msgs, ims)
        assert tk.input_ids == ref["input_ids"][0].tolist()
        enc = ad.encode_images(ims)
        ids = torch.tensor([tk.input_ids])
        with torch.no_grad():
            own = ad.model(**ref).logits
            ours = ad.forward(ids, torch.ones_like(ids), encoded=enc, image_indices=[[0, 1]]).logits
            pixels = ad.forward(ids, torch.ones_like(ids), pixel_inputs=ad.collate_images(ims)).logits
        assert (own - ours).abs().max().item() <= 1e-5
        assert (own - pixels).abs().max().item() <= 1e-5
    finally:
        ad.image_kwargs.clear()
        ad.image_kwargs.update(saved)
