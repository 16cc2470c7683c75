"""Gemma 3 specifics (the shared contract runs in test_families.py): the bidirectional image
blocks need ``token_type_ids``, which the adapter derives; the expansion is tokenized inside the
text (newline merges); pan-and-scan crops; generation equals the model's own."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.data.schema import ImageRef, Message
from vlmalign.models import VLMAdapter, adapter_for, build_tiny, to_hf_messages
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
    """A wide image becomes the full view + crops, each its own soft-token block."""
    ip = ad.processor.image_processor
    saved = (ip.do_pan_and_scan, ip.pan_and_scan_min_crop_size, ip.pan_and_scan_max_num_crops,
             ip.pan_and_scan_min_ratio_to_activate)
    ip.do_pan_and_scan, ip.pan_and_scan_min_crop_size, ip.pan_and_scan_max_num_crops = True, 16, 4
    ip.pan_and_scan_min_ratio_to_activate = 1.2
    try:
        pil = [_img("red", 96, 32), _img("blue")]
        ims = [ad.preprocess_image(p) for p in pil]
        assert ims[0].tensors["pixel_values"].shape[0] == 4 and ims[1].tensors["pixel_values"].shape[0] == 1
        assert ims[0].num_features == 16 and ims[1].num_features == 4
        msgs = [Message.user(ImageRef(path="a.png"), "Left?", ImageRef(path="b.png")), Message.assistant("red")]
        # the processor's call passes its own pan-and-scan defaults (off) unless given them
        ref = ad.processor(text=ad.render(msgs), images=pil, return_tensors="pt", add_special_tokens=False,
                           do_pan_and_scan=True, pan_and_scan_min_crop_size=16, pan_and_scan_max_num_crops=4,
                           pan_and_scan_min_ratio_to_activate=1.2)
        tk = ad.tokenize_messages(msgs, ims)
        assert tk.input_ids == ref["input_ids"][0].tolist()
        enc = ad.encode_images(ims)
        ids = torch.tensor([tk.input_ids])
        with torch.no_grad():
            own = ad.model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                           pixel_values=ref["pixel_values"], token_type_ids=ref["token_type_ids"]).logits
            ours = ad.forward(ids, torch.ones_like(ids), encoded=enc, image_indices=[[0, 1]]).logits
        assert (own - ours).abs().max().item() <= 1e-5
    finally:
        (ip.do_pan_and_scan, ip.pan_and_scan_min_crop_size, ip.pan_and_scan_max_num_crops,
         ip.pan_and_scan_min_ratio_to_activate) = saved


def test_generation_equals_the_models_own(ad):
    """Greedy generation from encoded features, left-padded beside a longer prompt, equals the
    model's own generate from the processor's inputs."""
    pil = [_img("red"), _img("blue")]
    ims = [ad.preprocess_image(p) for p in pil]
    prompts = [[Message.user(ImageRef(path="a.png"), "What colour?")],
               [Message.user(ImageRef(path="b.png"), "What colour is the circle in the picture?")]]
    enc = ad.encode_images(ims)
    rows = [ad.tokenize_prompt(p, [im]).input_ids for p, im in zip(prompts, ims)]
    L = max(map(len, rows))
    pad = ad.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        out = ad.new_tokens(ad.generate(ids, mask, encoded=enc, image_indices=[[0], [1]], **kw), ids)
        for b, (p, im) in enumerate(zip(prompts, pil)):
            text = ad.processor.apply_chat_template(to_hf_messages(p), tokenize=False, add_generation_prompt=True)
            ref = ad.processor(text=text, images=[im], return_tensors="pt", add_special_tokens=False)
            own = ad.model.generate(**ref, **kw)[:, ref["input_ids"].shape[1]:]
            n = own.shape[1]
            assert out[b, :n].tolist() == own[0].tolist()
