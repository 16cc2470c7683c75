"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL specifics beyond the shared contract test (test_families.py):
size-dependent image token counts, M-RoPE with image grids of different sizes in one padded
batch, generation with precomputed features, the image-only processor save/load path, and
Qwen3-VL's DeepStack features."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.data.schema import ImageRef, Message
from vlmalign.models import adapter_for, build_tiny, load_adapter
from vlmalign.models.qwen2_vl import Qwen2VLAdapter, image_only_processor_class

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _img(colour: str, size=(64, 64)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    w, h = size
    ImageDraw.Draw(im).ellipse([w // 8, h // 8, w // 2, h // 2], fill=colour)
    return im


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    torch.manual_seed(0)
    model, processor = build_tiny(request.param)
    return request.param, adapter_for(model.eval(), processor)


def _processor_ids(ad, text: str, images):
    return ad.processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)


def _prompt(ad, pil, question="What colour is the circle?"):
    ims = [ad.preprocess_image(pil)]
    return ad.tokenize_prompt([Message.user(ImageRef(path="x.png"), question)], ims).input_ids, ims


# (width, height) -> (t, h, w) patch grid; patch 8, merge 2: sides round to multiples of 16 px,
# then scale into [4, 36] tokens. 300x200 is over the 36*256 = 9216 px cap:
# beta = sqrt(60000 / 9216) = 2.55, h = floor(200 / 2.55 / 16) * 16 = 64, w = floor(300 / 2.55 / 16) * 16 = 112.
# 16x16 is under the 4*256 = 1024 px floor: beta = 2, both sides ceil(16 * 2 / 16) * 16 = 32.
@pytest.mark.parametrize("size,grid", [((64, 64), (1, 8, 8)), ((80, 48), (1, 6, 10)), ((32, 32), (1, 4, 4)),
                                       ((300, 200), (1, 8, 14)), ((16, 16), (1, 4, 4))])
def test_image_token_count_matches_processor(tiny, size, grid):
    """Token count = t*h*w / merge^2 of the processor's grid, and equals what the processor expands to."""
    family, ad = tiny
    im = _img("red", size)
    inp = ad.preprocess_image(im)
    assert tuple(inp.tensors["image_grid_thw"][0].tolist()) == grid
    assert ad.image_token_count(im) == inp.num_tokens == inp.num_features == grid[1] * grid[2] // 4
    ref = _processor_ids(ad, "<|vision_start|><|image_pad|><|vision_end|>", [im])
    assert int((ref["input_ids"][0] == ad.image_token_id).sum()) == inp.num_tokens
    # the tiny processor keeps images small: 64x64 -> 16 tokens, never over 36
    assert 4 <= inp.num_tokens <= 36


def test_template_is_chatml_with_vision_markers(tiny):
    family, ad = tiny
    text = ad.render([Message.user(ImageRef(path="a.png"), "Hi"), Message.assistant("red")])
    # Qwen2(.5)-VL-Instruct's template adds a default system turn; Qwen3-VL-Instruct's does not
    system = "" if family == "qwen3_vl" else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert text == (system + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
                    "<|im_start|>assistant\nred<|im_end|>\n")
    assert ad.tokenizer.eos_token == "<|im_end|>"


def _padded(rows, pad, left: bool):
    L = max(map(len, rows))
    ids = [([pad] * (L - len(r)) + r) if left else (r + [pad] * (L - len(r))) for r in rows]
    mask = [([0] * (L - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (L - len(r))) for r in rows]
    return torch.tensor(ids), torch.tensor(mask), L


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_batch_with_different_grids_equals_per_row(tiny, left):
    """Two rows, images with different grids (8x8 and 6x10 patches), the second row using its
    image in reversed order: batched logits from precomputed features == per-row logits, and
    == the model's own pixel path on the batch."""
    family, ad = tiny
    pil = [_img("red"), _img("blue", (80, 48))]
    ims = [ad.preprocess_image(p) for p in pil]
    assert ims[0].num_tokens != ims[1].num_tokens
    enc = ad.encode_images(ims)
    r0 = ad.tokenize_prompt([Message.user(ImageRef(path="a.png"), "What colour?")], [ims[0]]).input_ids
    r1 = ad.tokenize_prompt([Message.user(ImageRef(path="b.png"), "Describe.", ImageRef(path="a.png"),
                                          "Which shape is on the left?")], [ims[1], ims[0]]).input_ids
    rows, indices = [r0, r1], [[0], [1, 0]]
    ids, mask, L = _padded(rows, ad.tokenizer.pad_token_id, left)
    with torch.no_grad():
        batched = ad.forward(ids, mask, encoded=enc, image_indices=indices).logits
        texts = [ad.tokenizer.decode(r) for r in rows]
        # undo the expansion for the processor: one <|image_pad|> per image
        for im in ims:
            texts = [t.replace("<|image_pad|>" * im.num_tokens, "<|image_pad|>") for t in texts]
        ref = ad.processor(text=texts, images=[pil[0], pil[1], pil[0]], return_tensors="pt", padding=True,
                           padding_side="left" if left else "right", add_special_tokens=False)
        assert torch.equal(ref["input_ids"], ids)
        pix = {k: v for k, v in ref.items() if k not in ("input_ids", "attention_mask")}
        from_pixels = ad.forward(ref["input_ids"], ref["attention_mask"], pixel_inputs=pix).logits
        for b, r in enumerate(rows):
            single = ad.forward(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), encoded=enc,
                                image_indices=[indices[b]]).logits[0]
            sl = slice(L - len(r), L) if left else slice(0, len(r))
            assert (single - batched[b, sl]).abs().max().item() <= 1e-5
            assert (from_pixels[b, sl] - batched[b, sl]).abs().max().item() <= 1e-5


def test_mm_kwargs_pass_grid_rows_in_use_order(tiny):
    family, ad = tiny
    ims = [ad.preprocess_image(_img("red")), ad.preprocess_image(_img("blue", (80, 48)))]
    enc = ad.encode_images(ims)
    kw = ad.mm_kwargs(enc, [1, 0, 1])
    assert kw["image_grid_thw"].tolist() == [[1, 6, 10], [1, 8, 8], [1, 6, 10]]
    feats = kw["mm_encoder_outputs"]["image"].pooler_output
    assert [f.shape[0] for f in feats] == [15, 16, 15]
    assert ad.mm_kwargs(enc, []) == {}


def test_mrope_uses_the_image_grid(tiny):
    """Without image_grid_thw the model falls back to 1-D positions: the logits must change,
    so the grid really reaches M-RoPE on the precomputed-features path."""
    family, ad = tiny
    ids, ims = _prompt(ad, _img("red"))
    enc = ad.encode_images(ims)
    x = torch.tensor([ids])
    with torch.no_grad():
        with_grid = ad.forward(x, torch.ones_like(x), encoded=enc, image_indices=[[0]]).logits
        kw = ad.mm_kwargs(enc, [0])
        kw.pop("image_grid_thw")
        ad.model.model.rope_deltas = None
        no_grid = ad.model(input_ids=x, attention_mask=torch.ones_like(x), **kw).logits
    assert (with_grid - no_grid).abs().max().item() > 1e-3


def _generate(ad, ids, mask, **kw):
    with torch.no_grad():
        out = ad.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                do_sample=False, **kw)
    return out[:, ids.shape[1]:]


def test_generation_with_precomputed_features(tiny):
    """Greedy generation from precomputed features == from pixel values (KV cache, rope deltas),
    and a left-padded batch of two different grids == each row alone."""
    family, ad = tiny
    pil = [_img("red"), _img("blue", (80, 48))]
    questions = ["What colour?", "Describe the image please."]
    singles = []
    for p, q in zip(pil, questions):
        ids, ims = _prompt(ad, p, q)
        x = torch.tensor([ids])
        enc = ad.encode_images(ims)
        kw = ad.mm_kwargs(enc, [0])
        kw.update(ad._extra_forward_kwargs(x, torch.ones_like(x), kw))
        from_feats = _generate(ad, x, torch.ones_like(x), **kw)
        text = ad.tokenizer.decode(ids).replace("<|image_pad|>" * ims[0].num_tokens, "<|image_pad|>")
        ref = _processor_ids(ad, text, [p])
        assert torch.equal(ref["input_ids"], x)
        from_pixels = _generate(ad, ref["input_ids"], ref["attention_mask"],
                                **{k: v for k, v in ref.items() if k not in ("input_ids", "attention_mask")})
        assert torch.equal(from_feats, from_pixels)
        singles.append(from_feats[0])
    rows, ims = zip(*[_prompt(ad, p, q) for p, q in zip(pil, questions)])
    ims = [i[0] for i in ims]
    ids, mask, _ = _padded(list(rows), ad.tokenizer.pad_token_id, left=True)
    enc = ad.encode_images(ims)
    kw = ad.mm_kwargs(enc, [0, 1])
    kw.update(ad._extra_forward_kwargs(ids, mask, kw))
    batched = _generate(ad, ids, mask, **kw)
    for b in range(2):
        assert torch.equal(batched[b], singles[b])


def test_param_groups(tiny):
    family, ad = tiny
    groups = {g: [n for n, _ in ps] for g, ps in ad.param_groups().items()}
    # the merger (and Qwen3-VL's DeepStack mergers) sit under model.visual. but are projector
    assert groups["projector"] and all(n.startswith(ad.projector_prefixes) for n in groups["projector"])
    assert {p for p in ad.projector_prefixes if any(n.startswith(p) for n in groups["projector"])} == \
        set(ad.projector_prefixes)
    assert groups["vision"] and all(n.startswith("model.visual.") and "merger" not in n for n in groups["vision"])
    assert groups["head"] == ["lm_head.weight"]
    assert all(n.startswith("model.language_model.") for n in groups["language"])
    targets = ad.lora_target_modules()
    assert targets and all(t.startswith("model.language_model.layers.") for t in targets)
    assert any(t.endswith("self_attn.q_proj") for t in targets) and any(t.endswith("mlp.down_proj") for t in targets)


def test_save_load_round_trip(tiny, tmp_path):
    """Save as a normal HF dir, reload through load_adapter: the image-only processor comes back
    (AutoProcessor alone would return the bare tokenizer), and ids + logits are unchanged."""
    family, ad = tiny
    ad.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "config.json") and os.path.isfile(tmp_path / "chat_template.jinja")
    ad2 = load_adapter(str(tmp_path))
    assert isinstance(ad2, Qwen2VLAdapter) and ad2.family == family
    assert isinstance(ad2.processor, image_only_processor_class(family))
    assert ad2.processor.image_processor.patch_size == ad.processor.image_processor.patch_size
    # picklable (DataLoader workers): the processor classes live at module level
    assert type(pickle.loads(pickle.dumps(ad2.processor))) is type(ad2.processor)
    pil = _img("red", (80, 48))
    ids, ims = _prompt(ad, pil)
    ids2, ims2 = _prompt(ad2, pil)
    assert ids == ids2 and torch.equal(ims[0].tensors["pixel_values"], ims2[0].tensors["pixel_values"])
    x = torch.tensor([ids])
    with torch.no_grad():
        a = ad.forward(x, torch.ones_like(x), encoded=ad.encode_images(ims), image_indices=[[0]]).logits
        b = ad2.forward(x, torch.ones_like(x), encoded=ad2.encode_images(ims2), image_indices=[[0]]).logits
    assert torch.equal(a, b)


def test_fallback_reads_legacy_chat_template_json(tiny, tmp_path):
    family, ad = tiny
    ad.processor.save_pretrained(str(tmp_path))
    os.remove(tmp_path / "chat_template.jinja")
    with open(tmp_path / "chat_template.json", "w") as f:
        json.dump({"chat_template": "{% for m in messages %}{{ m['role'] }}{% endfor %}"}, f)
    proc = Qwen2VLAdapter._build_image_only_processor(str(tmp_path), family)
    assert proc.chat_template == "{% for m in messages %}{{ m['role'] }}{% endfor %}"


def test_qwen3_vl_deepstack_features_travel_with_the_image():
    """Qwen3-VL: an encoding holds the main and the DeepStack feature maps side by side, and the
    forward needs the DeepStack ones (main features alone give other logits)."""
    torch.manual_seed(0)
    model, processor = build_tiny("qwen3_vl")
    ad = adapter_for(model.eval(), processor)
    ids, ims = _prompt(ad, _img("red"))
    enc = ad.encode_images(ims)
    hidden, layers = model.config.text_config.hidden_size, len(model.config.vision_config.deepstack_visual_indexes)
    assert enc.features[0].shape == (ims[0].num_features, (1 + layers) * hidden)
    kw = ad.mm_kwargs(enc, [0])
    deep = kw["mm_encoder_outputs"]["image"].deepstack_features
    assert len(deep) == layers and deep[0][0].shape == (ims[0].num_features, hidden)
    x = torch.tensor([ids])
    with torch.no_grad():
        full = ad.forward(x, torch.ones_like(x), encoded=enc, image_indices=[[0]]).logits
        kw["mm_encoder_outputs"]["image"].deepstack_features = [tuple(torch.zeros_like(f) for f in d) for d in deep]
        kw.update(ad._extra_forward_kwargs(x, torch.ones_like(x), kw))
        ad.model.model.rope_deltas = None
        without = ad.model(input_ids=x, attention_mask=torch.ones_like(x), **kw).logits
    assert (full - without).abs().max().item() > 1e-3
