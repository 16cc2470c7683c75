"""Llama 3.2 Vision specifics (the shared contract runs in test_families.py): images reach the
decoder through cross-attention, so encode-once works on the cross-attention states: the mask
derived from the ids equals the processor's, rows with different image counts equal each row
alone, and generation continues from a prefilled cache without re-encoding."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmalign.data.schema import ImageRef, Message
from vlmalign.models import adapter_for, build_tiny


@pytest.fixture(scope="module")
def ad():
    torch.manual_seed(0)
    model, processor = build_tiny("mllama")
    return adapter_for(model.eval(), processor)


def _ims(ad, sizes=((64, 64), (64, 32), (32, 64))):
    pil = [Image.new("RGB", s, c) for s, c in zip(sizes, ("red", "blue", "green"))]
    return pil, [ad.preprocess_image(p) for p in pil]


MSGS = [Message.user(ImageRef(path="a.png"), "First?"), Message.assistant("red"),
        Message.user("Now these two:", ImageRef(path="b.png"), ImageRef(path="c.png")), Message.assistant("blue")]


def test_one_token_per_image_and_features_beside_it(ad):
    _, ims = _ims(ad)
    assert [im.num_tokens for im in ims] == [1, 1, 1]
    assert all(im.num_features == 2 * 17 for im in ims)            # max tiles x (4x4 patches + CLS)
    enc = ad.encode_images(ims)
    assert enc.extras["num_tiles"].tolist() == [1, 2, 2]          # square: 1 tile; 2:1 either way: 2


def _alone(ad, msgs, pil):
    """The model's own forward on one unpadded sequence from the processor."""
    ref = ad.processor(text=ad.render(msgs), images=pil, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return ad.model(**ref).logits[0]


SHORT = [Message.user(ImageRef(path="a.png"), "Hi"), Message.assistant("ok")]
TWO = [Message.user(ImageRef(path="a.png"), "Both:", ImageRef(path="b.png")), Message.assistant("ok")]


@pytest.mark.parametrize("shape", ["3+1", "2+3", "0+1"])
def test_rows_with_different_image_counts_equal_each_row_alone(ad, shape):
    """Each row of a padded batch equals its own unbatched forward, also the tokens before its
    first image (which the model lets attend to every image slot): rows hold copies of their
    images, not padding. The processor's own padded batch does not have this property."""
    pil, ims = _ims(ad)
    rows = {"3+1": [(MSGS, [0, 1, 2]), (SHORT, [0])], "2+3": [(TWO, [1, 2]), (MSGS, [0, 1, 2])],
            "0+1": [([Message.user("Hi"), Message.assistant("ok")], []), (SHORT, [2])]}[shape]
    toks = [ad.tokenize_messages(m, [ims[i] for i in idx]).input_ids for m, idx in rows]
    L = max(map(len, toks))
    pad = ad.tokenizer.pad_token_id
    ids = torch.tensor([t + [pad] * (L - len(t)) for t in toks])
    mask = torch.tensor([[1] * len(t) + [0] * (L - len(t)) for t in toks])
    enc = ad.encode_images(ims)
    with torch.no_grad():
        got = ad.forward(ids, mask, encoded=enc, image_indices=[idx for _, idx in rows]).logits
    for b, (m, idx) in enumerate(rows):
        alone = _alone(ad, m, [pil[i] for i in idx] or None)
        assert (got[b, :len(toks[b])] - alone).abs().max().item() <= 1e-5, b
    if shape == "3+1":  # the processor's padded batch: row 1's first tokens read its padding image
        ref = ad.processor(text=[ad.render(m) for m, _ in rows], images=[[pil[i] for i in idx] for _, idx in rows],
                           return_tensors="pt", add_special_tokens=False, padding=True)
        mm = ad._mm_inputs(ref["input_ids"], ref["attention_mask"], enc, [idx for _, idx in rows])
        assert torch.equal(mm["cross_attention_mask"], ref["cross_attention_mask"])
        with torch.no_grad():
            theirs = ad.model(**ref).logits
        assert (theirs[1, :len(toks[1])] - _alone(ad, SHORT, [pil[0]])).abs().max().item() > 1e-4


def test_mask_follows_the_image_tokens(ad):
    """Text reads the image before it (consecutive images together); text before any image reads
    none (the model then lifts its mask, see the module doc)."""
    _, ims = _ims(ad)
    ids = torch.tensor([ad.tokenize_messages(MSGS, ims).input_ids])
    enc = ad.encode_images(ims)
    where = (ids[0] == ad.image_token_id).nonzero().flatten().tolist()
    m = ad._mm_inputs(ids, None, enc, [[0, 1, 2]])["cross_attention_mask"][0]   # (L, images, tiles)
    seen = m.amax(-1)                                                             # (L, images)
    assert seen[:where[0]].sum() == 0
    assert seen[where[0]:where[1]].tolist() == [[1, 0, 0]] * (where[1] - where[0])
    assert where[2] == where[1] + 1 and seen[where[1]].tolist() == [0, 1, 0]   # each image from its token on
    assert seen[where[2]:].tolist() == [[0, 1, 1]] * (ids.shape[1] - where[2])
    assert m[where[0], 0].tolist() == [1, 0] and m[where[1], 1].tolist() == [1, 1]   # real tiles only


def test_generation_reuses_the_encoding_and_expands_rows(ad):
    _, ims = _ims(ad)
    ids = torch.tensor([ad.tokenize_prompt([Message.user(ImageRef(path="a.png"), "What colour?")], ims[1:2]).input_ids])
    enc = ad.encode_images(ims[1:2])
    calls = ad.encode_calls
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        one = ad.generate(ids, torch.ones_like(ids), encoded=enc, image_indices=[[0]], **kw)
        two = ad.generate(ids, torch.ones_like(ids), encoded=enc, image_indices=[[0]], num_return_sequences=2, **kw)
    assert ad.encode_calls == calls
    assert two.shape[0] == 2 and torch.equal(two[0], one[0]) and torch.equal(two[1], one[0])
    assert torch.equal(one[0, :ids.shape[1]], ids[0])


def test_too_many_slots_fall_back_to_padding_and_say_so(ad, monkeypatch, caplog):
    import logging

    from vlmalign.models import mllama
    monkeypatch.setattr(mllama, "MAX_IMAGE_SLOTS", 3)
    _, ims = _ims(ad)
    toks = [ad.tokenize_messages(TWO, ims[1:]).input_ids, ad.tokenize_messages(MSGS, ims).input_ids]
    L = max(map(len, toks))
    ids = torch.tensor([t + [ad.tokenizer.pad_token_id] * (L - len(t)) for t in toks])
    with caplog.at_level(logging.WARNING, logger="vlmalign.models.mllama"):
        mm = ad._mm_inputs(ids, None, ad.encode_images(ims), [[1, 2], [0, 1, 2]])
    assert mm["cross_attention_mask"].shape[2] == 3 and mm["cross_attention_states"].shape[1] == 3 * 34
    assert "tokens before a row's first image read zero-padded image slots" in caplog.text
