"""InstructBLIP specifics: instruction-dependent image encoding (Q-Former), query tokens before
BOS, one image per sample, generation from precomputed features, parameter groups."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.data.schema import ImageRef, Message
from vlmalign.errors import DataError, ModelError
from vlmalign.models import IGNORE_INDEX, adapter_for, build_tiny, load_adapter


def _img(colour="red", shape="circle", size=48):
    im = Image.new("RGB", (size, size), "white")
    (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(
        [size // 8, size // 8, size // 2, size // 2], fill=colour)
    return im


@pytest.fixture(scope="module")
def ad():
    torch.manual_seed(0)
    model, processor = build_tiny("instructblip")
    return adapter_for(model.eval(), processor)


def _conv(q="What colour is the circle?"):
    return [Message.system("Answer briefly."), Message.user(ImageRef(path="a.png"), q), Message.assistant("red"),
            Message.user("And the square?"), Message.assistant("blue")]


def test_image_prompt_is_the_user_turn_holding_the_image(ad):
    assert ad.image_prompt(_conv()) == "What colour is the circle?"
    # later turns do not change it, so the whole conversation shares one encoding
    assert ad.image_prompt(_conv()[:3]) == ad.image_prompt(_conv())
    msgs = [Message.user("First a question."), Message.assistant("ok"),
            Message.user("  Now look: ", ImageRef(path="a.png"), " what is it? ")]
    assert ad.image_prompt(msgs) == "Now look: what is it?"
    assert ad.image_prompt("verbatim text") == "verbatim text"
    with pytest.raises(DataError, match="no message holds an image"):
        ad.image_prompt([Message.user("no image here")])


def test_encoding_depends_on_instruction(ad):
    im = ad.preprocess_image(_img())
    with torch.no_grad():
        a = ad.encode_images([im, im, im], prompts=[_conv("What colour is the circle?"),
                                                    _conv("What colour is the circle?"),
                                                    _conv("How many objects are there?")]).features
    assert a[0].shape == (8, ad.model.config.text_config.hidden_size)
    assert torch.equal(a[0], a[1])
    assert (a[0] - a[2]).abs().max().item() > 1e-4


def test_encode_without_prompts_is_an_error(ad):
    im = ad.preprocess_image(_img())
    with pytest.raises(ModelError, match="prompts"):
        ad.encode_images([im])
    with pytest.raises(ModelError, match="one prompt per image"):
        ad.encode_images([im, im], prompts=["just one"])
    assert ad.encoding_uses_prompt and ad.image_prompt is not None


def test_padded_prompt_batch_equals_one_by_one(ad):
    ims = [ad.preprocess_image(_img("red")), ad.preprocess_image(_img("blue", "square"))]
    prompts = ["red?", "Is there a blue square in the bottom right of the image? Answer yes or no."]
    with torch.no_grad():
        together = ad.encode_images(ims, prompts=prompts).features
        alone = [ad.encode_images([i], prompts=[p]).features[0] for i, p in zip(ims, prompts)]
    for t, a in zip(together, alone):
        assert (t - a).abs().max().item() <= 1e-5


def test_features_equal_hf_path_for_the_instruction(ad):
    """Our encoding of (image, messages) == the model's own path on what the processor makes of
    (image, instruction): the standard InstructBLIP call."""
    pil = _img()
    msgs = _conv()[:2]
    ref = ad.processor(images=pil, text="What colour is the circle?", return_tensors="pt")
    with torch.no_grad():
        hf = ad.model.get_image_features(pixel_values=ref["pixel_values"], qformer_input_ids=ref["qformer_input_ids"],
                                         qformer_attention_mask=ref["qformer_attention_mask"]).pooler_output[0]
        ours = ad.encode_images([ad.preprocess_image(pil)], prompts=[msgs]).features[0]
    assert (hf - ours).abs().max().item() <= 1e-6


def test_bert_like_qformer_tokenizer_adds_cls_sep_like_the_processor(tmp_path):
    model, processor = build_tiny("instructblip", bert_like_qformer_tokenizer=True)
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    ad = load_adapter(str(tmp_path))
    qt = ad.qformer_tokenizer
    ids = qt("red circle")["input_ids"]
    assert ids[0] == qt.convert_tokens_to_ids("[CLS]") and ids[-1] == qt.convert_tokens_to_ids("[SEP]")
    pil = _img()
    ref = ad.processor(images=pil, text="red circle", return_tensors="pt")
    assert ref["qformer_input_ids"][0].tolist() == ids
    batch = ad._encoder_text_inputs([[Message.user(ImageRef(path="a.png"), "red circle")]], 1)
    assert batch["qformer_input_ids"][0].tolist() == ids
    with torch.no_grad():
        hf = ad.model.get_image_features(**{k: ref[k] for k in ("pixel_values", "qformer_input_ids",
                                                                "qformer_attention_mask")}).pooler_output[0]
        ours = ad.encode_images([ad.preprocess_image(pil)], prompts=["red circle"]).features[0]
    assert (hf - ours).abs().max().item() <= 1e-6


def test_query_tokens_go_before_bos(ad):
    im = ad.preprocess_image(_img())
    msgs = [Message.user(ImageRef(path="a.png"), "Describe."), Message.assistant("a red circle")]
    tk = ad.tokenize_messages(msgs, [im])
    n = ad.model.config.num_query_tokens
    assert im.num_tokens == n and tk.image_token_counts == [n]
    assert tk.input_ids[:n] == [ad.image_token_id] * n
    assert tk.input_ids[n] == ad.tokenizer.bos_token_id
    assert ad.image_token_id not in tk.input_ids[n:]
    assert tk.labels[:n + 1] == [IGNORE_INDEX] * (n + 1)
    # the processor's own layout for the same text
    ref = ad.processor(text=ad.render(msgs), images=_img(), add_special_tokens=False)
    assert ref["input_ids"][0] == tk.input_ids
    # image in a later turn: still in front (InstructBLIP has one place for its image)
    later = [Message.user("Hi."), Message.assistant("hello"),
             Message.user(ImageRef(path="a.png"), "Describe."), Message.assistant("a red circle")]
    assert ad.tokenize_messages(later, [im]).input_ids[:n] == [ad.image_token_id] * n


def test_one_image_per_sample_and_no_literal_image_token(ad):
    im = ad.preprocess_image(_img())
    two = [Message.user(ImageRef(path="a.png"), ImageRef(path="b.png"), "Compare."), Message.assistant("ok")]
    with pytest.raises(DataError, match="at most 1 image"):
        ad.tokenize_messages(two, [im, im])
    literal = [Message.user(ImageRef(path="a.png"), "What is <image>?"), Message.assistant("ok")]
    with pytest.raises(DataError, match="image token"):
        ad.tokenize_messages(literal, [im])


def test_text_only_rows_and_shared_encoding(ad):
    im = ad.preprocess_image(_img())
    prompt = [Message.user(ImageRef(path="a.png"), "What colour?")]
    p, c, _ = ad.tokenize_completion(prompt, "red", [im])
    t, _, _ = ad.tokenize_completion([Message.user("Say red.")], "red", [])
    with torch.no_grad():
        enc = ad.encode_images([im], prompts=[prompt])
        calls = ad.encode_calls
        text_only = ad.forward(torch.tensor([t]), torch.ones(1, len(t), dtype=torch.long)).logits
        ref = ad.model.language_model(input_ids=torch.tensor([t])).logits
        assert (text_only - ref).abs().max().item() <= 1e-6
        # one encoding: policy row with the image + a text-only row in the same batch
        rows = [p + c, t + [ad.tokenizer.pad_token_id] * (len(p + c) - len(t))]
        mask = torch.tensor([[1] * len(p + c), [1] * len(t) + [0] * (len(p + c) - len(t))])
        both = ad.forward(torch.tensor(rows), mask, encoded=enc, image_indices=[[0], []]).logits
        single = ad.forward(torch.tensor([p + c]), encoded=enc, image_indices=[[0]]).logits
    assert ad.encode_calls == calls
    assert (both[0] - single[0]).abs().max().item() <= 1e-5


def test_generate_from_features_equals_hf_generate(ad):
    pil = _img()
    prompt = [Message.user(ImageRef(path="a.png"), "What colour is the circle?")]
    tk = ad.tokenize_prompt(prompt, [ad.preprocess_image(pil)])
    ids = torch.tensor([tk.input_ids])
    ref = ad.processor(images=pil, text="What colour is the circle?", return_tensors="pt")
    with torch.no_grad():
        enc = ad.encode_images([ad.preprocess_image(pil)], prompts=[prompt])
        ours = ad.generate(ids, torch.ones_like(ids), encoded=enc, image_indices=[[0]],
                           max_new_tokens=6, do_sample=False)
        hf = ad.model.generate(pixel_values=ref["pixel_values"], qformer_input_ids=ref["qformer_input_ids"],
                               qformer_attention_mask=ref["qformer_attention_mask"], input_ids=ids,
                               attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert ours.shape[1] > ids.shape[1]
    assert torch.equal(ours, hf)
    with pytest.raises(ModelError, match="image tokens"):
        ad.generate(ids, encoded=None, max_new_tokens=1)


def test_param_groups(ad):
    g = {k: [n for n, _ in v] for k, v in ad.param_groups().items()}
    assert g["vision"] and all(n.startswith("vision_model.") for n in g["vision"])
    assert "query_tokens" in g["projector"]
    assert any(n.startswith("qformer.") for n in g["projector"])
    assert {"language_projection.weight", "language_projection.bias"} <= set(g["projector"])
    assert g["head"] == ["language_model.lm_head.weight"]
    assert g["language"] and all(n.startswith("language_model.model.") for n in g["language"])
    targets = ad.lora_target_modules()
    assert targets and all(t.startswith("language_model.model.") for t in targets)


def test_gradient_reaches_qformer_and_query_tokens(ad):
    ad.set_trainable(vision=False, projector=True, language=False)
    try:
        ad.model.zero_grad()
        im = ad.preprocess_image(_img())
        msgs = [Message.user(ImageRef(path="a.png"), "Describe."), Message.assistant("a red circle")]
        tk = ad.tokenize_messages(msgs, [im])
        enc = ad.encode_images([im], prompts=[msgs])
        ids = torch.tensor([tk.input_ids])
        ad.forward(ids, encoded=enc, image_indices=[[0]], labels=torch.tensor([tk.labels])).loss.backward()
        assert ad.model.query_tokens.grad.abs().sum() > 0
        assert ad.model.language_projection.weight.grad.abs().sum() > 0
        assert all(p.grad is None for _, p in ad.param_groups()["vision"] + ad.param_groups()["language"])
    finally:
        ad.set_trainable(vision=True, projector=True, language=True)
        ad.model.zero_grad()
