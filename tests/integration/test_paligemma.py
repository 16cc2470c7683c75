"""PaliGemma specifics: images-first prefix/suffix layout, prefix-LM token_type_ids, and parity
with the stock processor's ``suffix=`` training path (ids, types, labels, loss, generation)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.data.schema import ImageRef, Message, PreferencePair
from vlmalign.errors import DataError, ModelError
from vlmalign.models import IGNORE_INDEX, adapter_for, build_tiny, to_hf_messages


def _img(colour: str) -> Image.Image:
    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).ellipse([8, 8, 32, 32], fill=colour)
    return im


@pytest.fixture(scope="module")
def ad():
    model, processor = build_tiny("paligemma")
    return adapter_for(model, processor)


def _single(question="What colour is the circle?", answer="red"):
    return [Message.user(ImageRef(path="a.png"), question), Message.assistant(answer)]


CONVERSATIONS = [
    _single(),
    [Message.user(ImageRef(path="a.png"), "What colour?")],
    [Message.system("Answer briefly."), *_single()],
    [Message.user(ImageRef(path="a.png"))],
    [Message.user(ImageRef(path="a.png"), "First?"), Message.assistant("one"),
     Message.user("Second?", ImageRef(path="b.png")), Message.assistant("two")],
    [Message.user(ImageRef(path="a.png"), "First?"), Message.assistant("one"), Message.user("Second?")],
    [Message.system("Be brief.\n"), Message.user(ImageRef(path="a.png"), " What?\n\n  Answer in a word. \n"),
     Message.assistant("red\nreally"), Message.user("And\nnow?"), Message.assistant("blue")],
    [Message.system("Only system.")],
]


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_chat_template_equals_adapter_layout(ad, i):
    msgs = CONVERSATIONS[i]
    for gen in (False, True):
        tmpl = ad.processor.apply_chat_template(to_hf_messages(msgs), tokenize=False, add_generation_prompt=gen)
        assert tmpl == ad.render(msgs, add_generation_prompt=gen)


def test_layout_images_first_then_bos(ad):
    text = ad.render(CONVERSATIONS[4])
    assert text == "<image><image><bos>First?\none<eos>Second?\ntwo<eos>"
    assert ad.render(CONVERSATIONS[2]) == "<image><bos>Answer briefly. What colour is the circle?\nred<eos>"


def test_single_turn_matches_processor_suffix_path(ad):
    """ids, token_type_ids and labels equal the processor's text=/suffix= output, and so does the
    loss: ours from precomputed features with derived types, theirs from pixel values."""
    pil = [_img("red")]
    ims = [ad.preprocess_image(p) for p in pil]
    msgs = _single()
    tk = ad.tokenize_messages(msgs, ims)
    ref = ad.processor(text="<image>What colour is the circle?", images=pil, suffix="red",
                       return_tensors="pt", add_special_tokens=False)
    assert ad.processor_inputs(msgs, pil) == {"text": "<image>What colour is the circle?", "images": pil,
                                              "suffix": "red"}
    ids = torch.tensor([tk.input_ids])
    mask = torch.ones_like(ids)
    assert torch.equal(ids, ref["input_ids"])
    types = ad.token_type_ids(ids, mask)
    assert torch.equal(types, ref["token_type_ids"])
    assert tk.labels == ref["labels"][0].tolist()
    # the suffix is exactly the supervised part: answer + EOS
    assert types[0].sum().item() == sum(lab != IGNORE_INDEX for lab in tk.labels)
    with torch.no_grad():
        theirs = ad.model(**ref).loss
        enc = ad.encode_images(ims)
        ours = ad.forward(ids, mask, encoded=enc, image_indices=[[0]], labels=torch.tensor([tk.labels])).loss
    assert abs(theirs.item() - ours.item()) <= 1e-5


def test_prefix_lm_attention_is_used(ad):
    """Derived types change the logits (bidirectional prefix), so a wrong split could not pass."""
    ims = [ad.preprocess_image(_img("red"))]
    tk = ad.tokenize_messages(_single(), ims)
    ids = torch.tensor([tk.input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        enc = ad.encode_images(ims)
        prefix_lm = ad.forward(ids, mask, encoded=enc, image_indices=[[0]]).logits
        causal = ad.forward(ids, mask, encoded=enc, image_indices=[[0]],
                            token_type_ids=torch.ones_like(ids)).logits
    assert (prefix_lm - causal).abs().max().item() > 1e-3


def test_batch_of_prompts_with_padding_matches_processor(ad):
    pil = [_img("red"), _img("blue")]
    ims = [ad.preprocess_image(p) for p in pil]
    convs = [_single("What colour is the circle?", "red"), _single("Colour?", "a blue circle")]
    ref = ad.processor(text=[ad.processor_inputs(c)["text"] for c in convs], images=[[p] for p in pil],
                       suffix=[ad.processor_inputs(c)["suffix"] for c in convs], padding=True,
                       return_tensors="pt", add_special_tokens=False)
    rows = [ad.tokenize_messages(c, [im]) for c, im in zip(convs, ims)]
    L = max(len(r) for r in rows)
    ids = torch.tensor([r.input_ids + [ad.tokenizer.pad_token_id] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert torch.equal(ad.token_type_ids(ids, mask), ref["token_type_ids"])
    with torch.no_grad():
        theirs = ad.model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                          pixel_values=ref["pixel_values"], token_type_ids=ref["token_type_ids"]).logits
        ours = ad.forward(ids, mask, encoded=ad.encode_images(ims), image_indices=[[0], [1]]).logits
    keep = mask.bool()
    assert (theirs[keep] - ours[keep]).abs().max().item() <= 1e-5


def test_first_prompt_is_one_line_so_types_are_exact(ad):
    """LLaVA-style prompts carry newlines; the prefix is made one line, so the split derived from
    ids is exactly the processor's (on processor_inputs), for training and generation alike."""
    pil = [_img("red")]
    ims = [ad.preprocess_image(p) for p in pil]
    msgs = _single("What colour?\nAnswer the question using a single word or phrase.", "red\nreally")
    assert ad.render(msgs) == ("<image><bos>What colour? Answer the question using a single word or phrase.\n"
                               "red\nreally<eos>")
    tk = ad.tokenize_messages(msgs, ims)
    ref = ad.processor(**ad.processor_inputs(msgs, pil), return_tensors="pt", add_special_tokens=False)
    ids = torch.tensor([tk.input_ids])
    assert torch.equal(ids, ref["input_ids"])
    assert torch.equal(ad.token_type_ids(ids), ref["token_type_ids"])   # the answer's newline is no boundary
    assert tk.labels == ref["labels"][0].tolist()


def test_ids_made_elsewhere_with_newline_prompt(ad):
    """Ids from the raw processor (prompt with a newline): the derived prefix stops at that newline
    (never later, so no answer token is ever bidirectional); ``prompt_lengths`` is exact."""
    pil = [_img("red")]
    ims = [ad.preprocess_image(p) for p in pil]
    ref = ad.processor(text="<image>What colour?\nAnswer with one word.", images=pil, suffix="red",
                       return_tensors="pt", add_special_tokens=False)
    ids = ref["input_ids"]
    derived = ad.token_type_ids(ids)
    first_sup = int((ref["labels"][0] != IGNORE_INDEX).nonzero()[0])
    assert derived[0, first_sup:].eq(1).all()                       # answers always causal
    assert derived[0].sum() > ref["token_type_ids"][0].sum()       # prefix shorter than the processor's
    exact = ad.token_type_ids(ids, prompt_lengths=[first_sup])
    assert torch.equal(exact, ref["token_type_ids"])
    with torch.no_grad():
        theirs = ad.model(**ref).logits
        ours = ad.forward(ids, torch.ones_like(ids), encoded=ad.encode_images(ims), image_indices=[[0]],
                          token_type_ids=exact).logits
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_preference_rows_split_at_the_prompt(ad):
    ims = [ad.preprocess_image(_img("red"))]
    pair = PreferencePair([Message.user(ImageRef(path="a.png"), "Describe.")], "a red circle", "a green star")
    tp = ad.tokenize_preference(pair, ims)
    n = len(ims[0].expansion)
    assert tp.prompt_ids[:n] == ims[0].expansion and tp.prompt_ids[n] == ad.tokenizer.bos_token_id
    assert tp.chosen_ids[-1] == tp.rejected_ids[-1] == ad.tokenizer.eos_token_id
    for comp in (tp.chosen_ids, tp.rejected_ids):
        ids = torch.tensor([tp.prompt_ids + comp])
        assert torch.equal(ad.token_type_ids(ids), ad.token_type_ids(ids, prompt_lengths=[len(tp.prompt_ids)]))


def test_generation_matches_processor_path(ad):
    pil = [_img("red")]
    ims = [ad.preprocess_image(p) for p in pil]
    prompt = [Message.user(ImageRef(path="a.png"), "What colour?")]
    tk = ad.tokenize_prompt(prompt, ims)
    ref = ad.processor(**ad.processor_inputs(prompt, pil), return_tensors="pt", add_special_tokens=False)
    ids = torch.tensor([tk.input_ids])
    assert torch.equal(ids, ref["input_ids"])
    assert ad.token_type_ids(ids).eq(0).all() and ref["token_type_ids"].eq(0).all()
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    with torch.no_grad():
        theirs = ad.model.generate(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                                   pixel_values=ref["pixel_values"], token_type_ids=ref["token_type_ids"], **kw)
        ours = ad.generate(ids, torch.ones_like(ids), encoded=ad.encode_images(ims), image_indices=[[0]], **kw)
    assert torch.equal(theirs, ours)


def test_param_groups_tied_head(ad):
    groups = ad.param_groups()
    assert all(n.startswith("model.vision_tower.") for n, _ in groups["vision"])
    assert all(n.startswith("model.multi_modal_projector.") for n, _ in groups["projector"])
    # the output head is tied to the embeddings (as in the real model): it is counted once, as language
    assert ad.model.lm_head.weight is ad.model.get_input_embeddings().weight
    assert groups["head"] == []
    assert any(n.startswith("model.language_model.") for n, _ in groups["language"])


def test_layout_errors(ad):
    ims = [ad.preprocess_image(_img("red"))]
    with pytest.raises(DataError, match="start with a user turn"):
        ad.tokenize_messages([Message.assistant("hi"), Message.user(ImageRef(path="a.png"), "x")], ims)
    with pytest.raises(DataError, match="system messages must come before"):
        ad.tokenize_messages([Message.user(ImageRef(path="a.png"), "x"), Message.system("s")], ims)
    with pytest.raises(ModelError, match="suffix always ends with EOS"):
        ad.processor_inputs(CONVERSATIONS[5])
