"""LLaVA-NeXT specifics: AnyRes tiles, size-dependent token counts, image_newline, templates."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.data.schema import ImageRef, Message
from vlmalign.models import IGNORE_INDEX, adapter_for, build_tiny

# (width, height): square (5 tiles), wide and tall (3 tiles each, exact fit), and two that
# need unpadding (the resized image does not fill its best grid resolution)
SIZES = [(64, 64), (64, 32), (32, 64), (50, 30), (20, 100)]


def _img(size, colour="red"):
    im = Image.new("RGB", size, "white")
    w, h = size
    ImageDraw.Draw(im).ellipse([w // 8, h // 8, w // 2, h // 2], fill=colour)
    return im


@pytest.fixture(scope="module")
def ad():
    torch.manual_seed(0)
    model, processor = build_tiny("llava_next")
    return adapter_for(model.eval(), processor)


def test_token_count_depends_on_size_and_matches_processor(ad):
    counts = {}
    for size in SIZES:
        inp = ad.preprocess_image(_img(size))
        ref = ad.processor(text="<image>", images=[_img(size)], return_tensors="pt")
        n_ref = int((ref["input_ids"] == ad.image_token_id).sum())
        assert inp.num_tokens == inp.num_features == n_ref, size
        h, w = size[1], size[0]
        assert ad.processor._get_num_multimodal_tokens(image_sizes=[[h, w]]).num_image_tokens == [n_ref]
        counts[size] = n_ref
    # 32x32 base tile with 8x8 patches: base 16 + 8x8 grid + 8 newlines for a square image
    assert counts[(64, 64)] == 16 + 64 + 8
    # wide (2 tiles side by side) vs tall: same number of grid features, newlines per row differ
    assert counts[(64, 32)] == 16 + 4 * 8 + 4 and counts[(32, 64)] == 16 + 8 * 4 + 8
    # unpadding drops padded rows/columns, so odd aspect ratios give fewer tokens than their grid
    assert counts[(50, 30)] < counts[(64, 32)] and counts[(20, 100)] < counts[(32, 64)]


def test_tiles_per_image_differ_and_collate_pads_like_the_processor(ad):
    ims = [_img(s) for s in [(64, 64), (64, 32)]]
    inputs = [ad.preprocess_image(i) for i in ims]
    assert [it.tensors["pixel_values"].shape[1] for it in inputs] == [5, 3]
    batch = ad.collate_images(inputs)
    ref = ad.processor.image_processor(ims, return_tensors="pt")
    assert batch["pixel_values"].shape == ref["pixel_values"].shape == (2, 5, 3, 32, 32)
    assert torch.equal(batch["pixel_values"], ref["pixel_values"])
    assert torch.equal(batch["image_sizes"], ref["image_sizes"])


def test_batched_encoding_equals_one_by_one(ad):
    inputs = [ad.preprocess_image(_img(s)) for s in SIZES]
    with torch.no_grad():
        together = ad.encode_images(inputs).features
        alone = [ad.encode_images([it]).features[0] for it in inputs]
    for t, a, it in zip(together, alone, inputs):
        assert t.shape == a.shape == (it.num_features, ad.model.config.text_config.hidden_size)
        assert (t - a).abs().max().item() <= 1e-5


def test_packed_features_close_rows_with_image_newline(ad):
    """64x64: 16 base features, then 8 rows of (8 grid features + image_newline)."""
    with torch.no_grad():
        f = ad.encode_images([ad.preprocess_image(_img((64, 64)))]).features[0]
    nl = ad.model.model.image_newline
    rows = f[16:].view(8, 9, -1)
    assert torch.equal(rows[:, 8], nl.expand(8, -1))
    assert not torch.isclose(rows[:, :8], nl).all(-1).any()
    assert not torch.isclose(f[:16], nl).all(-1).any()


def test_precomputed_features_equal_pixel_values_for_mixed_sizes(ad):
    pil = [_img((64, 32), "red"), _img((30, 50), "blue")]
    msgs = [Message.user(ImageRef(path="a.png"), ImageRef(path="b.png"), "Which is red?"),
            Message.assistant("the left one")]
    ims = [ad.preprocess_image(p) for p in pil]
    tk = ad.tokenize_messages(msgs, ims)
    ref = ad.processor(text=ad.render(msgs), images=pil, return_tensors="pt", add_special_tokens=False)
    assert tk.input_ids == ref["input_ids"][0].tolist()
    assert tk.image_token_counts == [ims[0].num_tokens, ims[1].num_tokens]
    assert ims[0].num_tokens != ims[1].num_tokens
    ids = torch.tensor([tk.input_ids])
    with torch.no_grad():
        from_pixels = ad.forward(ids, torch.ones_like(ids), pixel_inputs={
            "pixel_values": ref["pixel_values"], "image_sizes": ref["image_sizes"]}).logits
        enc = ad.encode_images(ims)
        from_feats = ad.forward(ids, torch.ones_like(ids), encoded=enc, image_indices=[[0, 1]]).logits
        swapped = ad.forward(ids.new_tensor([ad.tokenize_messages(msgs, ims[::-1]).input_ids]),
                             encoded=enc, image_indices=[[1, 0]]).logits
    assert (from_pixels - from_feats).abs().max().item() <= 1e-5
    assert swapped.shape == from_feats.shape  # rows may use shared images in any order


def test_param_groups_put_image_newline_in_projector(ad):
    g = {k: [n for n, _ in v] for k, v in ad.param_groups().items()}
    assert "model.image_newline" in g["projector"]
    assert all(n.startswith(("model.multi_modal_projector.", "model.image_newline")) for n in g["projector"])
    assert g["vision"] and all(n.startswith("model.vision_tower.") for n in g["vision"])
    assert g["head"] == ["lm_head.weight"]
    assert all(n.startswith("model.language_model.") for n in g["language"])


def test_gradient_reaches_projector_and_newline_through_shared_features(ad):
    ad.set_trainable(vision=False, projector=True, language=False)
    try:
        ad.model.zero_grad()
        im = ad.preprocess_image(_img((50, 30)))
        msgs = [Message.user(ImageRef(path="a.png"), "Describe."), Message.assistant("a red circle")]
        tk = ad.tokenize_messages(msgs, [im])
        enc = ad.encode_images([im])  # one encoding, two rows
        ids = torch.tensor([tk.input_ids] * 2)
        out = ad.forward(ids, torch.ones_like(ids), encoded=enc, image_indices=[[0], [0]],
                         labels=torch.tensor([tk.labels] * 2))
        out.loss.backward()
        assert ad.model.model.image_newline.grad is not None
        assert ad.model.model.image_newline.grad.abs().sum() > 0
        assert ad.model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
        assert all(p.grad is None for _, p in ad.param_groups()["vision"])
        assert ad.encode_calls >= 1
    finally:
        ad.set_trainable(vision=True, projector=True, language=True)
        ad.model.zero_grad()


def test_mistral_template_ids_and_masks():
    model, processor = build_tiny("llava_next", template="mistral")
    ad = adapter_for(model.eval(), processor)
    msgs = [Message.user(ImageRef(path="a.png"), "What colour is the circle?"), Message.assistant("red"),
            Message.user("And the square?"), Message.assistant("blue")]
    text = ad.render(msgs)
    assert text == ("<s>[INST] <image>\nWhat colour is the circle? [/INST] red</s>"
                    "[INST] And the square? [/INST] blue</s>")
    assert ad.render(msgs[:1], add_generation_prompt=True).endswith("[/INST]")
    pil = [_img((64, 32))]
    ims = [ad.preprocess_image(p) for p in pil]
    tk = ad.tokenize_messages(msgs, ims)
    ref = processor(text=text, images=pil, return_tensors="pt", add_special_tokens=False)
    assert tk.input_ids == ref["input_ids"][0].tolist()
    runs, cur = [], []
    for t, lab in zip(tk.input_ids, tk.labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert [ad.tokenizer.decode(r, skip_special_tokens=True).strip() for r in runs] == ["red", "blue"]
    assert all(r[-1] == ad.tokenizer.eos_token_id for r in runs)
    p, c, _ = ad.tokenize_completion(msgs[:1], "red", ims)
    assert ad.tokenizer.decode(p[-3:]).endswith("[/INST]")
