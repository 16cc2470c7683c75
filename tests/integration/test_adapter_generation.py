"""The public generation helpers of the adapter contract (``position_ids``, ``new_tokens``) on
tiny random-init models: positions of left-padded rows equal the ones the model computes for
itself, and every family's ``generate`` returns prompt + new ids (InstructBLIP included)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.data.schema import ImageRef, Message
from vlmalign.models import adapter_for, build_tiny


def _img(colour: str, size=(64, 64)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    w, h = size
    ImageDraw.Draw(im).ellipse([w // 8, h // 8, w // 2, h // 2], fill=colour)
    return im


def _adapter(family):
    torch.manual_seed(0)
    model, processor = build_tiny(family)
    return adapter_for(model.eval(), processor)


def _left_padded(ad, questions, images):
    """Two prompts of different lengths (one image each), left-padded: ids, mask, items, prompts."""
    rows, items, prompts = [], [], []
    for q, pil in zip(questions, images):
        msgs = [Message.user(ImageRef(path=f"{q}.png"), q)]
        item = ad.preprocess_image(pil)
        rows.append(ad.tokenize_prompt(msgs, [item]).input_ids)
        items.append(item)
        prompts.append(msgs)
    L = max(map(len, rows))
    pad = ad.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    assert (mask == 0).any()  # the premise: one row is padded
    return ids, mask, items, prompts


QUESTIONS = ["What colour?", "Describe the circle in the picture, please, in a few words."]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_position_ids_are_the_models_own_m_rope_positions(family):
    ad = _adapter(family)
    ids, mask, items, _ = _left_padded(ad, QUESTIONS, [_img("red"), _img("blue", (80, 48))])
    real = mask.bool()
    with torch.no_grad():
        enc = ad.encode_images(items)
        pos = ad.position_ids(ids, mask, encoded=enc, image_indices=[[0], [1]])
        assert pos.shape == (4, 2, ids.shape[1])
        # row 0: text positions, the attention mask's running count
        assert torch.equal(pos[0], (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))
        # rows 1-3: the t/h/w ids the model's get_rope_index computes from grids and token types
        types = (ids == ad.image_token_id).int()
        grid = enc.extras["image_grid_thw"]
        want, _ = ad.model.model.get_rope_index(ids, image_grid_thw=grid, attention_mask=mask,
                                                mm_token_type_ids=types)
        assert torch.equal(pos[1:][:, real], want[:, real])
        # image tokens are not a running count (the premise of M-RoPE)
        assert not torch.equal(pos[1][real], pos[0][real])
        # a forward with these ids == the model's forward computing its own positions
        given = ad.forward(ids, mask, encoded=enc, image_indices=[[0], [1]], position_ids=pos).logits
        own = ad.forward(ids, mask, encoded=enc, image_indices=[[0], [1]]).logits
        flat = pos.clone()
        flat[1:] = pos[0]  # 1-D counts for t/h/w: what a forward without M-RoPE ids would use
        wrong = ad.forward(ids, mask, encoded=enc, image_indices=[[0], [1]], position_ids=flat).logits
    assert (given - own)[real].abs().max().item() <= 1e-5
    assert (wrong - own)[real].abs().max().item() > 1e-4  # the check can tell positions apart


def test_llava_position_ids_count_real_tokens_only():
    ad = _adapter("llava")
    ids, mask, items, _ = _left_padded(ad, QUESTIONS, [_img("red"), _img("blue")])
    with torch.no_grad():
        enc = ad.encode_images(items)
        pos = ad.position_ids(ids, mask, encoded=enc, image_indices=[[0], [1]])
        assert torch.equal(pos, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))
        # the padded row scored with them == the same row alone, without padding
        padded = ad.forward(ids, mask, encoded=enc, image_indices=[[0], [1]], position_ids=pos).logits
        n = int(mask[0].sum())
        alone = ad.forward(ids[:1, -n:], mask[:1, -n:], encoded=enc, image_indices=[[0]]).logits
    assert (padded[0, -n:] - alone[0]).abs().max().item() <= 1e-5


def test_instructblip_takes_no_position_ids():
    ad = _adapter("instructblip")
    ids, mask, items, prompts = _left_padded(ad, QUESTIONS, [_img("red"), _img("blue")])
    enc = ad.encode_images(items, prompts=prompts)
    assert ad.position_ids(ids, mask, encoded=enc, image_indices=[[0], [1]]) is None


def test_instructblip_generate_returns_prompt_and_new_ids_whatever_its_language_model_returns(monkeypatch):
    ad = _adapter("instructblip")
    ids, mask, items, prompts = _left_padded(ad, QUESTIONS, [_img("red"), _img("blue")])
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=ad.tokenizer.pad_token_id)
    with torch.no_grad():
        enc = ad.encode_images(items, prompts=prompts)
        full = ad.generate(ids, mask, encoded=enc, image_indices=[[0], [1]], **kw)
        assert full.shape == (2, ids.shape[1] + 4) and torch.equal(full[:, :ids.shape[1]], ids)
        lm_generate = ad.model.language_model.generate

        def new_ids_only(*args, **kwargs):  # a generate from embeddings that leaves the prompt out
            return lm_generate(*args, **kwargs)[:, ids.shape[1]:]

        monkeypatch.setattr(ad.model.language_model, "generate", new_ids_only)
        again = ad.generate(ids, mask, encoded=enc, image_indices=[[0], [1]], **kw)
    assert torch.equal(again, full)
    assert torch.equal(ad.new_tokens(again, ids), full[:, ids.shape[1]:])


def test_new_tokens_drops_the_prompt_and_keeps_an_output_without_it():
    ad = _adapter("llava")
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    new = torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(ad.new_tokens(torch.cat([ids, new], 1), ids), new)
    assert torch.equal(ad.new_tokens(new, ids), new)            # a generate that returns new ids only
    assert ad.new_tokens(ids, ids).shape == (2, 0)              # nothing generated
