"""Idefics3 / SmolVLM specifics: image splitting (sub-images + global view), batches of images
with different sub-image counts, and SmolVLM's processor without torchvision."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.data.schema import ImageRef, Message
from vlmalign.models import IGNORE_INDEX, adapter_for, build_tiny, load_adapter


def _img(colour: str, size=(64, 64)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.ellipse([4, 4, size[0] // 2, size[1] // 2], fill=colour)
    return im


SQUARE = (64, 64)   # split: 2 x 2 sub-images + global = 5
WIDE = (64, 16)     # split: 1 x 2 sub-images + global = 3


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def split(request):
    model, processor = build_tiny(request.param, image_splitting=True)
    return adapter_for(model, processor)


@pytest.fixture(scope="module")
def unsplit():
    model, processor = build_tiny("idefics3")
    return adapter_for(model, processor)


def _conv():
    return [Message.user(ImageRef(path="a.png"), "What colour is the circle?"), Message.assistant("red"),
            Message.user("And this one?", ImageRef(path="b.png")), Message.assistant("blue")]


def test_unsplit_image_is_one_global_view(unsplit):
    ad = unsplit
    it = ad.preprocess_image(_img("red"))
    assert ad.num_subimages(it) == 1
    assert it.tensors["pixel_values"].shape == (1, 1, 3, 32, 32)
    seq = ad.processor.image_seq_len
    assert seq == ad.model.model.image_seq_len == 16
    toks = ad.tokenizer.convert_ids_to_tokens(it.expansion)
    assert toks == ["<fake_token_around_image>", "<global-img>"] + ["<image>"] * seq + ["<fake_token_around_image>"]
    assert it.num_features == seq and it.num_tokens == seq + 3


@pytest.mark.parametrize("size,grid", [(SQUARE, (2, 2)), (WIDE, (1, 2))])
def test_split_expansion_rows_cols_and_global(split, size, grid):
    ad = split
    it = ad.preprocess_image(_img("red", size))
    rows, cols = grid
    seq = ad.processor.image_seq_len
    assert ad.num_subimages(it) == rows * cols + 1
    assert it.num_features == (rows * cols + 1) * seq
    toks = ad.tokenizer.convert_ids_to_tokens(it.expansion)
    tags = [t for t in toks if t.startswith("<row_")]
    assert tags == [f"<row_{r}_col_{c}>" for r in range(1, rows + 1) for c in range(1, cols + 1)]
    assert toks.count("<global-img>") == 1 and toks[-1] == "<fake_token_around_image>"
    # our count is the length of the processor's own expansion of one image placeholder (transformers'
    # _get_num_multimodal_tokens was compared here before: from 5.25 it counts the image tokens alone)
    ref = ad.processor(text="<image>", images=[_img("red", size)], return_tensors="pt", add_special_tokens=False)
    assert it.num_tokens == ref["input_ids"].shape[1]
    assert it.expansion == ref["input_ids"][0].tolist()


def test_split_ids_and_masks_match_processor(split):
    ad = split
    pil = [_img("red", SQUARE), _img("blue", WIDE)]
    ims = [ad.preprocess_image(p) for p in pil]
    tk = ad.tokenize_messages(_conv(), ims)
    ref = ad.processor(text=ad.render(_conv()), images=pil, return_tensors="pt", add_special_tokens=False)
    assert tk.input_ids == ref["input_ids"][0].tolist()
    assert ref["pixel_values"].shape[:2] == (1, 5 + 3)
    sup = [t for t, lab in zip(tk.input_ids, tk.labels) if lab != IGNORE_INDEX]
    assert ad.tokenizer.decode(sup, skip_special_tokens=True).split() == ["red", "blue"]
    assert sup.count(ad.tokenizer.eos_token_id) == 2
    assert tk.image_token_counts == [ims[0].num_tokens, ims[1].num_tokens]


def test_collate_pads_different_subimage_counts(split):
    ad = split
    a, b = ad.preprocess_image(_img("red", SQUARE)), ad.preprocess_image(_img("blue", WIDE))
    batch = ad.collate_images([b, a])
    assert batch["pixel_values"].shape == (2, 5, 3, 32, 32)
    assert batch["pixel_attention_mask"].shape == (2, 5, 32, 32)
    # the 3-sub-image image is padded with all-zero sub-images (which the model drops)
    assert torch.equal(batch["pixel_values"][0, :3], b.tensors["pixel_values"][0])
    assert batch["pixel_values"][0, 3:].abs().sum() == 0 and batch["pixel_attention_mask"][0, 3:].sum() == 0
    assert torch.equal(batch["pixel_values"][1], a.tensors["pixel_values"][0])


def test_batched_encoding_equals_one_by_one(split):
    ad = split
    a, b = ad.preprocess_image(_img("red", SQUARE)), ad.preprocess_image(_img("blue", WIDE))
    with torch.no_grad():
        both = ad.encode_images([a, b])
        alone = [ad.encode_images([x]).features[0] for x in (a, b)]
    assert [f.shape[0] for f in both.features] == [a.num_features, b.num_features] == [80, 48]
    for f, g in zip(both.features, alone):
        assert (f - g).abs().max().item() <= 1e-5


def test_batch_rows_with_different_subimage_counts_match_processor(split):
    """Two rows, each with its own image (5 and 3 sub-images), right-padded: logits from our
    precomputed features equal the processor + pixel_values path (which pads sub-images itself)."""
    ad = split
    pil = [_img("red", SQUARE), _img("blue", WIDE)]
    ims = [ad.preprocess_image(p) for p in pil]
    convs = [[Message.user(ImageRef(path="a.png"), "Describe."), Message.assistant("a red circle")],
             [Message.user(ImageRef(path="b.png"), "What colour is it?"), Message.assistant("blue")]]
    texts = [ad.render(c) for c in convs]
    ref = ad.processor(text=texts, images=[[p] for p in pil], return_tensors="pt", add_special_tokens=False,
                       padding=True)
    assert ref["pixel_values"].shape[:2] == (2, 5)
    rows = [ad.tokenize_messages(c, [im]).input_ids for c, im in zip(convs, ims)]
    L = max(map(len, rows))
    pad = ad.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    pixel_inputs = {k: ref[k] for k in ("pixel_values", "pixel_attention_mask")}
    with torch.no_grad():
        from_pixels = ad.forward(ids, mask, pixel_inputs=pixel_inputs).logits
        enc = ad.encode_images(ims)
        from_feats = ad.forward(ids, mask, encoded=enc, image_indices=[[0], [1]]).logits
    keep = mask.bool()
    assert (from_pixels[keep] - from_feats[keep]).abs().max().item() <= 1e-5


def test_split_and_unsplit_share_weights_layout():
    """Splitting is a processor setting only: same parameters, different token counts."""
    m1, p1 = build_tiny("idefics3", image_splitting=False)
    m2, p2 = build_tiny("idefics3", image_splitting=True)
    assert m1.state_dict().keys() == m2.state_dict().keys()
    a1, a2 = adapter_for(m1, p1), adapter_for(m2, p2)
    assert a1.image_token_count(_img("red")) == 19 and a2.image_token_count(_img("red")) == 5 * 16 + 4 * 2 + 2 + 1 + 3


def test_gradients_reach_vision_tower_through_precomputed_features(unsplit):
    ad = unsplit
    ims = [ad.preprocess_image(_img("red"))]
    tk = ad.tokenize_messages([Message.user(ImageRef(path="a.png"), "Colour?"), Message.assistant("red")], ims)
    ad.model.zero_grad()
    enc = ad.encode_images(ims)
    out = ad.forward(torch.tensor([tk.input_ids]), torch.ones(1, len(tk), dtype=torch.long), encoded=enc,
                     image_indices=[[0]], labels=torch.tensor([tk.labels]))
    out.loss.backward()
    groups = ad.param_groups()
    for g in ("vision", "projector", "language"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in groups[g]), g
    assert all(n.startswith("model.vision_model.") for n, _ in groups["vision"])
    assert all(n.startswith("model.connector.") for n, _ in groups["projector"])
    assert [n for n, _ in groups["head"]] == ["lm_head.weight"]
    ad.model.zero_grad(set_to_none=True)


def test_smolvlm_processor_loads_without_torchvision(tmp_path):
    """A SmolVLM directory whose processor class needs torchvision/num2words (as real checkpoints
    say) still loads, through the image-only processor, with identical tokenization."""
    model, processor = build_tiny("smolvlm", image_splitting=True)
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    cfg_path = tmp_path / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["processor_class"] = "SmolVLMProcessor"
    cfg_path.write_text(json.dumps(cfg))
    ad = load_adapter(str(tmp_path))
    from transformers import SmolVLMProcessor
    assert isinstance(ad.processor, SmolVLMProcessor) and ad.processor.image_seq_len == 16
    assert ad.processor.image_processor.do_image_splitting
    orig = adapter_for(model, processor)
    pil = [_img("red", SQUARE), _img("blue", WIDE)]
    a = ad.tokenize_messages(_conv(), [ad.preprocess_image(p) for p in pil])
    b = orig.tokenize_messages(_conv(), [orig.preprocess_image(p) for p in pil])
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_image_seq_len_mismatch_is_an_error():
    from vlmalign.errors import ModelError
    model, processor = build_tiny("idefics3")
    processor.image_seq_len = 9
    with pytest.raises(ModelError, match="image_seq_len"):
        adapter_for(model, processor)


def test_end_of_utterance_closes_answers_when_eos_differs():
    """Idefics3-8B-Llama3: EOS is <|end_of_text|>, turns end with <end_of_utterance>. Answers are
    supervised up to <end_of_utterance> with nothing inserted (ids still equal the processor's),
    and generation stops on it."""
    model, processor = build_tiny("idefics3", eos_token="<|end_of_text|>")
    ad = adapter_for(model, processor)
    eou = ad.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert ad.tokenizer.eos_token_id != eou == ad.end_of_turn_id
    pil = [_img("red"), _img("blue")]
    ims = [ad.preprocess_image(p) for p in pil]
    tk = ad.tokenize_messages(_conv(), ims)
    ref = ad.processor(text=ad.render(_conv()), images=pil, return_tensors="pt", add_special_tokens=False)
    assert tk.input_ids == ref["input_ids"][0].tolist()
    assert ad.tokenizer.eos_token_id not in tk.input_ids
    sup = [t for t, lab in zip(tk.input_ids, tk.labels) if lab != IGNORE_INDEX]
    assert sup.count(eou) == 2 and sup[-1] == eou
    prompt, completion, _ = ad.tokenize_completion(_conv()[:1], "red", ims[:1])
    assert completion[-1] == eou and ad.tokenizer.decode(completion, skip_special_tokens=True).strip() == "red"
    assert eou in ad.stop_token_ids() and ad.tokenizer.eos_token_id in ad.stop_token_ids()
    seen = {}
    real_generate = ad.model.generate

    def spy(**kw):
        seen.update(kw)
        return real_generate(**kw)

    ad.model.generate = spy
    try:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ad.generate(ids, torch.ones_like(ids), encoded=ad.encode_images(ims[:1]), image_indices=[[0]],
                        max_new_tokens=2, do_sample=False)
    finally:
        del ad.model.generate
    assert eou in seen["eos_token_id"]
