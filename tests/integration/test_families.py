"""The adapter contract, checked on a tiny random-init model of every registered family.

Each family gets: build, save/reload (plain transformers and our loader), chat template with
image placeholders, token ids equal to the processor's, loss only on assistant turns, generation,
and logits from precomputed image features equal to logits from pixel values; then one step of
LoRA SFT and one of GRPO through the methods' own code (test_compose.py and test_generic.py run
these tests on composed models and on the generic fallback).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.data.schema import ImageRef, Message, PreferencePair
from vlmalign.errors import DataError, LengthError
from vlmalign.models import IGNORE_INDEX, adapter_for, build_tiny, families, load_adapter

FAMILIES = families()


def _img(colour: str, shape: str = "circle", size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    box = [size // 8, size // 8, size // 2, size // 2]
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=colour)
    return im


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    family = request.param
    torch.manual_seed(0)
    model, processor = build_tiny(family)
    model.eval()
    out = tmp_path_factory.mktemp(family)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return family, adapter_for(model, processor), out


def _conversation(adapter=None):
    """Two images in two turns; single-image families (``max_images`` 1) get the second
    question without its image."""
    second = ["And the square?", ImageRef(path="b.png")]
    if adapter is not None and adapter.max_images == 1:
        second = second[:1]
    return [Message.user(ImageRef(path="a.png"), "What colour is the circle?"),
            Message.assistant("red"),
            Message.user(*second),
            Message.assistant("blue")]


def _images(adapter, n=2, cap=True):
    if cap and adapter.max_images is not None:
        n = min(n, adapter.max_images)
    ims = [_img("red"), _img("blue", "square")][:n]
    return ims, [adapter.preprocess_image(i) for i in ims]


def test_expected_families_registered():
    expected = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "instructblip",
                "gemma3", "qwen3_vl", "internvl", "mllama"}
    assert expected <= set(FAMILIES), sorted(expected - set(FAMILIES))


def test_reload_with_plain_transformers_and_loader(tiny):
    family, ad, path = tiny
    from transformers import AutoModelForImageTextToText
    m2 = AutoModelForImageTextToText.from_pretrained(path)
    assert type(m2) is type(ad.model)
    sd1, sd2 = ad.model.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    ad2 = load_adapter(str(path))
    assert type(ad2) is type(ad)
    assert ad2.render(_conversation()) == ad.render(_conversation())


def test_chat_template_renders_placeholders(tiny):
    family, ad, _ = tiny
    msgs = _conversation(ad)
    text = ad.render(msgs)
    n_images = sum(1 for m in msgs for _ in m.images)
    # families that place image tokens themselves (InstructBLIP: before BOS) render none
    assert text.count(ad.placeholder_token) == (n_images if ad.placeholders_in_text else 0)
    assert "What colour is the circle?" in text and "blue" in text


def _processor_reference(ad, msgs, pil):
    """The family's processor on this conversation: the rendered text, except where the adapter
    says how its processor takes a conversation (``processor_inputs``: PaliGemma's takes the
    prompt as ``text`` and the answers as ``suffix``, see models/paligemma.py)."""
    inputs = (ad.processor_inputs(msgs, pil) if hasattr(ad, "processor_inputs")
              else {"text": ad.render(msgs), "images": pil})
    return ad.processor(**inputs, return_tensors="pt", add_special_tokens=False)


def test_token_ids_match_processor(tiny):
    family, ad, _ = tiny
    pil, ims = _images(ad)
    msgs = _conversation(ad)
    tk = ad.tokenize_messages(msgs, ims)
    ref = _processor_reference(ad, msgs, pil)
    # tiny templates close every answer with EOS, so nothing is added and ids must be equal
    assert tk.input_ids == ref["input_ids"][0].tolist()


def test_loss_only_on_assistant_turns(tiny):
    family, ad, _ = tiny
    _, ims = _images(ad)
    tk = ad.tokenize_messages(_conversation(ad), ims)
    sup = [t for t, lab in zip(tk.input_ids, tk.labels) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(tk.input_ids, tk.labels))
    runs, cur = [], []
    for t, lab in zip(tk.input_ids, tk.labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    # decoded run by run: ChatML templates (Qwen) put no space before an answer, so the decoded
    # concatenation of all supervised tokens would read "redblue"
    assert [ad.tokenizer.decode(r, skip_special_tokens=True).strip() for r in runs] == ["red", "blue"]
    # each supervised run ends with EOS so the model learns to stop
    eos = ad.tokenizer.eos_token_id
    assert len(runs) == 2 and all(r[-1] == eos for r in runs)
    # no image token is ever supervised
    assert ad.image_token_id not in sup


def test_precomputed_features_equal_pixel_values(tiny):
    family, ad, _ = tiny
    pil, ims = _images(ad)
    msgs = _conversation(ad)
    tk = ad.tokenize_messages(msgs, ims)
    text = ad.render(msgs)
    ref = _processor_reference(ad, msgs, pil)
    ids = torch.tensor([tk.input_ids])
    mask = torch.ones_like(ids)
    pixel_inputs = {k: v for k, v in ref.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        from_pixels = ad.forward(ref["input_ids"], torch.ones_like(ref["input_ids"]),
                                 pixel_inputs=pixel_inputs).logits
        # prompt-dependent encoders (InstructBLIP) get the text the processor was given
        enc = ad.encode_images(ims, prompts=[text] * len(ims))
        from_feats = ad.forward(ids, mask, encoded=enc, image_indices=[list(range(len(ims)))]).logits
    assert from_pixels.shape == from_feats.shape
    diff = (from_pixels - from_feats).abs().max().item()
    assert diff <= 1e-5, diff


def test_one_encoding_serves_many_rows(tiny):
    """Two rows sharing one image, features reused (and one row reversing image order)."""
    family, ad, _ = tiny
    pil, ims = _images(ad)
    pair = PreferencePair([Message.user(ImageRef(path="a.png"), "Describe.")], "a red circle", "a green star")
    enc = ad.encode_images(ims, prompts=[pair.prompt] * len(ims))
    calls = ad.encode_calls
    tp = ad.tokenize_preference(pair, ims[:1])
    rows = [tp.prompt_ids + tp.chosen_ids, tp.prompt_ids + tp.rejected_ids]
    L = max(map(len, rows))
    pad = ad.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    with torch.no_grad():
        both = ad.forward(ids, mask, encoded=enc, image_indices=[[0], [0]]).logits
        assert ad.encode_calls == calls  # forward never re-encodes
        for b, r in enumerate(rows):
            single = ad.forward(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long),
                                encoded=enc, image_indices=[[0]]).logits
            assert (single[0] - both[b, : len(r)]).abs().max().item() <= 1e-5


def test_generation_runs(tiny):
    family, ad, _ = tiny
    pil, ims = _images(ad, 1)
    prompt = [Message.user(ImageRef(path="a.png"), "What colour?")]
    tk = ad.tokenize_prompt(prompt, ims)
    ids = torch.tensor([tk.input_ids])
    enc = ad.encode_images(ims, prompts=[prompt])
    with torch.no_grad():
        out = ad.generate(ids, torch.ones_like(ids), encoded=enc, image_indices=[[0]], max_new_tokens=5,
                          do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_param_groups_and_lora_targets(tiny):
    family, ad, _ = tiny
    groups = ad.param_groups()
    for g in ("vision", "projector", "language"):
        assert groups[g], f"{family}: empty {g} group"
    names = {n for ps in groups.values() for n, _ in ps}
    assert len(names) == sum(len(v) for v in groups.values())
    targets = ad.lora_target_modules()
    assert targets
    vision = {n.rsplit(".", 1)[0] for n, _ in groups["vision"]}
    head = {n.rsplit(".", 1)[0] for n, _ in groups["head"]}
    assert not (set(targets) & vision) and not (set(targets) & head)
    ad.set_trainable(vision=False, projector=True, language=False)
    assert all(p.requires_grad for _, p in groups["projector"])
    assert not any(p.requires_grad for _, p in groups["vision"] + groups["language"])


def test_length_limit_never_cuts_image_tokens(tiny):
    family, ad, _ = tiny
    _, ims = _images(ad, 1)
    msgs = [Message.user(ImageRef(path="a.png"), "Describe the image."), Message.assistant("A red circle.")]
    n = len(ad.tokenize_messages(msgs, ims))
    assert ad.image_token_count(_img("red")) == ims[0].num_tokens > 0
    ad.tokenize_messages(msgs, ims, max_length=n)  # fits exactly
    with pytest.raises(LengthError, match="image"):
        ad.tokenize_messages(msgs, ims, max_length=n - 1)


def test_placeholder_mismatch_is_an_error(tiny):
    family, ad, _ = tiny
    _, ims = _images(ad, 2, cap=False)
    msgs = [Message.user(ImageRef(path="a.png"), "Describe."), Message.assistant("ok")]
    with pytest.raises(DataError, match="placeholder count 1 differs from image count 2"):
        ad.tokenize_messages(msgs, ims)


def test_text_only_record_and_mixed_batch(tiny):
    """A record without images tokenizes and runs, alone and beside a row with an image."""
    family, ad, _ = tiny
    text_only = ad.tokenize_messages([Message.user("Hello there"), Message.assistant("hi")], [])
    assert text_only.num_images == 0 and ad.image_token_id not in text_only.input_ids
    sup = [t for t, lab in zip(text_only.input_ids, text_only.labels) if lab != IGNORE_INDEX]
    assert ad.tokenizer.decode(sup, skip_special_tokens=True).strip() == "hi"
    pil, ims = _images(ad, 1)
    with_img = ad.tokenize_messages([Message.user(ImageRef(path="a.png"), "Colour?"), Message.assistant("red")], ims)
    rows = [text_only.input_ids, with_img.input_ids]
    L = max(map(len, rows))
    pad = ad.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    enc = ad.encode_images(ims, prompts=[[Message.user(ImageRef(path="a.png"), "Colour?")]])
    with torch.no_grad():
        both = ad.forward(ids, mask, encoded=enc, image_indices=[[], [0]]).logits
        alone = ad.forward(torch.tensor([rows[0]]), torch.ones(1, len(rows[0]), dtype=torch.long),
                           encoded=None, image_indices=[[]]).logits
    assert (both[0, : len(rows[0])] - alone[0]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- training steps
# one step of a real method run (the config, the engine, the method's own code) on the saved
# tiny model: LoRA through SFT, and GRPO with rollouts. test_compose.py runs both on its composed
# models too. Reward 1 when the response holds the letter e: about half of a random tiny model's
# samples do (PaliGemma's often hold only <loc> tokens, which decode to nothing), so a group's
# rewards differ and the step has a gradient.
LETTER_E = "reward=[{type: function, name: format, args: {pattern: e, mode: search}}]"


def _run(method: str, path, out, *sets):
    """One run of ``method`` from the model at ``path``: the trained adapter and the first logged
    training row."""
    from vlmalign.config import load_config
    from vlmalign.methods.registry import get
    from vlmalign.methods.setup import build_adapter
    cfg = load_config(get(method).config, None, [
        f"model.path={path}", "data.max_length=512", f"train.output_dir={out}", "train.max_steps=1",
        "train.progress=false", "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", *sets])
    adapter = build_adapter(cfg.model, seed=cfg.train.seed, lora_cfg=cfg.lora)
    get(method).train(cfg, adapter)   # trains adapter.model in place (wrapped by PEFT under LoRA)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return adapter, next(r for r in rows if any(k.startswith("train/") for k in r))


def test_lora_sft_step_trains_the_adapters_and_keeps_the_base(tiny, shapes_llava, tmp_path):
    """``lora.enabled=true`` with the family's default targets: LoRA B matrices (zero at the start)
    move in the language model; every base weight stays as saved; only PEFT's trainable copies
    of the projector (``modules_to_save``) and bare projector parameters (LLaVA-Next's
    image_newline) may change besides the adapters."""
    family, ad, path = tiny
    base = {k: v.clone() for k, v in ad.model.state_dict().items()}
    trained, row = _run("sft", path, tmp_path / "lora",
                        f"data.train_file={shapes_llava / 'data' / 'vqa_train.json'}", "train.batch_size=2",
                        "lora.enabled=true", "lora.r=4")
    assert row["train/loss"] > 0
    inner = trained.model     # PEFT injected its layers into the adapter's model in place
    moved_b = [n for n, p in inner.named_parameters() if "lora_B" in n and float(p.detach().abs().sum()) > 0]
    assert moved_b, f"{family}: no LoRA B matrix moved"
    language = {n.rsplit(".", 1)[0] for n, _ in ad.param_groups()["language"]}
    assert any(n.split(".lora_B.")[0] in language for n in moved_b), moved_b[:3]
    checked = 0
    for n, p in inner.named_parameters():
        if "lora_" in n or ".modules_to_save." in n:
            continue
        key = n.replace(".base_layer.", ".").replace(".original_module.", ".")
        if p.requires_grad:     # a bare trained parameter (saved in extra_params.safetensors)
            assert key in {k for k, _ in ad.param_groups()["projector"]}, f"{family}: {key} trains"
            continue
        assert torch.equal(p.detach(), base[key]), f"{family}: base weight {key} changed"
        checked += 1
    assert checked > len(language)


def test_grpo_step_samples_rollouts_and_updates_the_policy(tiny, shapes_llava, tmp_path):
    """One GRPO step (2 prompts x 4 samples of up to 4 tokens): responses are sampled, rewarded,
    and the language model moves; vision tower and projector stay frozen (GRPO's defaults)."""
    family, ad, path = tiny
    base = {k: v.clone() for k, v in ad.model.state_dict().items()}
    trained, row = _run("grpo", path, tmp_path / "grpo",
                        f"data.train_file={shapes_llava / 'data' / 'rl_train.json'}", "rollout.prompts_per_step=2",
                        "rollout.k=4", "rollout.max_new_tokens=4", "train.batch_size=8", LETTER_E)
    assert 0 < row["train/response_length"] <= 4
    assert row["train/reward_std"] > 0, f"{family}: every group had equal rewards, no gradient"
    after = trained.model.state_dict()
    groups = trained.param_groups()
    for g in ("vision", "projector"):
        for n, _ in groups[g]:
            assert torch.equal(after[n], base[n]), f"{family}: frozen {n} changed"
    moved = [n for n, _ in groups["language"] if not torch.equal(after[n], base[n])]
    assert moved, f"{family}: the language model did not move"
