"""Sequence packing for SFT (``data.packing``): several samples in one row, each whole.

What is checked, on tiny random-init models in fp32 (train mode; the tiny configs have no
dropout, except InstructBLIP's Q-Former: the seed is reset before each encoding):

* **Layout** (``SFTCollator(pack_length=...)``): the fewest rows within the budget, balanced,
  every sample once and whole (its image tokens included), ``segment_ids`` per token, the label
  of each sample's first token ignored, the same supervised-token count as the unpacked batch,
  and each row's image indices in placeholder order.
* **Loss and gradients** of ``SFTMethod.compute_loss`` on the packed batch against the unpacked
  batch of the same samples, for every family that packs, through both attention paths
  (transformers' restarting-position-ids path and our 4-D block-diagonal mask) on llava and
  qwen2_vl, with sdpa and eager attention. The micro-batch packs into rows holding several
  samples and several images, one sample has two images, one has none.
* **The comparison can fail**: the same packed rows with positions running on across samples
  (no packing support: samples attend to each other) give a clearly different loss.
* **A whole run**: ``train_sft`` with ``data.packing=true`` and gradient accumulation (llava in full
  and with LoRA, qwen2_vl) ends with the same per-step metrics (loss, supervised-token count,
  gradient norm), evaluation loss and weights as without.
* **Refusals**: a sample longer than the pack budget (LengthError naming the record; never cut),
  ``data.pack_length`` below ``data.max_length`` (ConfigError).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.config import ConfigError, load_config, validate_config
from vlmalign.data.batching import (IGNORE_INDEX, Batch, Example, ImageLoader, SFTCollator, pack_rows, prepare)
from vlmalign.data.schema import Conversation, ImageRef, Message
from vlmalign.errors import LengthError
from vlmalign.methods.sft import SFTConfig, SFTMethod, train_sft
from vlmalign.models import adapter_for

from tiny_kinds import build_kind

TOL = 1e-5
PACKING_FAMILIES = ["idefics3", "instructblip", "llava", "llava_next", "paligemma", "qwen2_5_vl", "qwen2_vl",
                    "smolvlm", "vlmalign_resampler", "qwen3_vl", "internvl",
                    # composed kinds with another projector, and the generic fallback (tiny_kinds.py)
                    "vlmalign_resampler:qformer", "vlmalign_resampler:linear", "vlmalign_resampler:mlp2x_gelu",
                    "generic"]
# these build attention from the whole row in ways packing cannot restart: refused (below)
REFUSED_FAMILIES = ["gemma3", "mllama"]


# ----------------------------------------------------------------------------- data
def _img(colour: str, shape: str = "circle", size=(64, 64)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    w, h = size
    box = [w // 8, h // 8, w // 2, h // 2]
    (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=colour)
    return im


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack_images")
    # different sizes: Qwen2-VL gives them different grids (and token counts)
    for name, colour, shape, size in (("red.png", "red", "circle", (64, 64)), ("blue.png", "blue", "square", (80, 48)),
                                      ("green.png", "green", "circle", (48, 80)),
                                      ("yellow.png", "yellow", "square", (64, 64))):
        _img(colour, shape, size).save(root / name)
    return root


def _records(max_images: int | None) -> list[Conversation]:
    """Six samples of different lengths: single-image VQA, a two-image two-turn conversation
    (one image for single-image families), a text-only one, a long caption, a shared image."""
    two = ([Message.user(ImageRef(path="blue.png"), "What is this?"), Message.assistant("a blue square"),
            Message.user(ImageRef(path="green.png"), "And this one?"),
            Message.assistant("a green circle, below the square")]
           if max_images is None or max_images >= 2 else
           [Message.user(ImageRef(path="blue.png"), "What is this?"), Message.assistant("a blue square"),
            Message.user("And its colour?"), Message.assistant("blue, like the sky")])
    convs = [
        [Message.user(ImageRef(path="red.png"), "What colour is the circle?"), Message.assistant("red")],
        two,
        [Message.user("Say hello."), Message.assistant("hello there, nice to meet you")],
        [Message.user(ImageRef(path="yellow.png"), "Describe the picture in detail."),
         Message.assistant("There is one yellow square in the top left part of the picture and nothing "
                           "else; the background is white.")],
        [Message.user(ImageRef(path="red.png"), "How many shapes?"), Message.assistant("1")],
        [Message.user(ImageRef(path="green.png"), "Which shape is it?"), Message.assistant("a circle")],
    ]
    return [Conversation(m, source="pack.json", index=i) for i, m in enumerate(convs)]


def _examples(adapter, image_dir):
    loader = ImageLoader(adapter, image_dir)

    def tok(rec, imgs):
        t = adapter.tokenize_record(rec, imgs, max_length=4096)
        return {"input_ids": t.input_ids, "labels": t.labels}

    examples, report = prepare(_records(adapter.max_images), tok, loader)
    assert report.count == 0
    return examples, loader


def _budget(examples) -> int:
    """A budget that makes several rows, some holding several samples (and images)."""
    lengths = sorted(len(e.rows["input_ids"]) for e in examples)
    return lengths[-1] + lengths[0] + 2


_MODELS: dict = {}


def _tiny(family: str, attn: str = "sdpa"):
    """A fresh adapter on a copy of the family's tiny model (built once per module run)."""
    if family not in _MODELS:
        torch.manual_seed(0)
        _MODELS[family] = build_kind(family)
    model, processor = _MODELS[family]
    model = copy.deepcopy(model).float()
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    model.train()
    return adapter_for(model, processor)


# ----------------------------------------------------------------------------- layout
def test_pack_rows_fewest_rows_then_balanced_within_the_budget():
    lengths = [5, 9, 3, 7, 2, 4]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    # best-fit decreasing needs 4 rows: 9 | 7+3 | 5+4 | 2 (the batch 10 wide); balanced over 4 rows
    # longest first: 9 | 7 | 5+2 | 4+3 (9 wide)
    assert rows == [[1], [3], [0, 4], [2, 5]]
    # where balancing gives no narrower batch, or would overflow a row, best-fit decreasing stays
    assert pack_rows([6, 6, 5, 4, 4], 10) == [[0, 3], [1, 4], [2]]      # 6+4 | 6+4 | 5 (balanced: 10 wide too)
    assert pack_rows([3, 3, 2, 2, 2], 6) == [[0, 1], [2, 3, 4]]         # balanced: 3+2+2 = 7 > 6
    assert pack_rows([10, 10], 10) == [[0], [1]]
    assert pack_rows([], 10) == []
    with pytest.raises(ValueError, match="over the pack budget"):
        pack_rows([3, 11], 10)


def test_packed_batch_layout(image_dir):
    ad = _tiny("llava")
    examples, loader = _examples(ad, image_dir)
    budget = _budget(examples)
    plain = SFTCollator(loader, ad.tokenizer.pad_token_id)(examples)
    packed = SFTCollator(loader, ad.tokenizer.pad_token_id, pack_length=budget)(examples)
    t = packed.tensors
    assert set(t) == {"input_ids", "attention_mask", "labels", "segment_ids"}
    n_rows = t["input_ids"].shape[0]
    assert 1 < n_rows < len(examples) and t["input_ids"].shape[1] <= budget
    assert packed.size == plain.size == len(examples)
    method = SFTMethod(ad)
    assert method.count_items(packed) == method.count_items(plain) > 0
    seen, several_images = [], False
    for r in range(n_rows):
        segs = t["segment_ids"][r]
        n = int((segs > 0).sum())
        assert torch.equal(t["attention_mask"][r, :n], torch.ones(n, dtype=torch.long))
        assert int(t["attention_mask"][r].sum()) == n and (segs[n:] == 0).all()
        k_max = int(segs.max())
        row_images = []
        for k in range(1, k_max + 1):
            where = (segs == k).nonzero().flatten()
            a, b = int(where[0]), int(where[-1]) + 1
            assert b - a == len(where)  # contiguous
            ids = t["input_ids"][r, a:b].tolist()
            i = next(j for j, e in enumerate(examples) if e.rows["input_ids"] == ids and j not in seen)
            seen.append(i)
            labels = t["labels"][r, a:b].tolist()
            assert labels[0] == IGNORE_INDEX and labels[1:] == examples[i].rows["labels"][1:]
            # the sample's images, whole: every image token of it is in the row
            assert ids.count(ad.image_token_id) == sum(loader.inputs(x).num_tokens for x in examples[i].images)
            row_images += plain.image_indices[i]
        # indices of the row's images in placeholder order (the plain batch's unique images are the same)
        assert [packed.images[j].expansion for j in packed.image_indices[r]] == \
            [plain.images[j].expansion for j in row_images]
        several_images |= len(packed.image_indices[r]) >= 2 and k_max >= 2
    assert sorted(seen) == list(range(len(examples)))
    assert several_images


# ----------------------------------------------------------------------------- loss and gradients
def _loss_and_grads(adapter, batch: Batch, n: int):
    adapter.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # InstructBLIP's Q-Former has dropout: the same masks for both encodings
    loss, sums = SFTMethod(adapter).compute_loss(batch, n)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in adapter.model.named_parameters() if p.grad is not None}
    return loss.detach(), sums, grads


def _compare(family: str, image_dir, attn: str = "sdpa", attention: str | None = None):
    ad = _tiny(family, attn)
    if attention is not None:
        ad.packing_attention = attention
    examples, loader = _examples(ad, image_dir)
    budget = _budget(examples)
    plain = SFTCollator(loader, ad.tokenizer.pad_token_id)(examples)
    packed = SFTCollator(loader, ad.tokenizer.pad_token_id, pack_length=budget)(examples)
    assert packed.tensors["input_ids"].shape[0] < len(examples)
    assert any(len(ix) >= 2 for ix in packed.image_indices)  # a row with several images
    method = SFTMethod(ad)
    n = method.count_items(plain)
    assert method.count_items(packed) == n
    # "global" count: this micro-batch as one of three (accumulation / processes)
    l0, s0, g0 = _loss_and_grads(ad, plain, 3 * n)
    l1, s1, g1 = _loss_and_grads(ad, packed, 3 * n)
    assert int(s0["items"]) == int(s1["items"]) == n
    assert g0.keys() == g1.keys() and len(g0) > 10
    return abs(l0.item() - l1.item()), _grad_diff(g0, g1), l0.item()


def _grad_diff(g0: dict, g1: dict) -> float:
    """Max over parameters of max |difference|, relative to the parameter's largest gradient
    where that is above 1 (InstructBLIP's zero-initialised query tokens get gradients ~3e5;
    everywhere else this is the absolute difference)."""
    return max((g0[k] - g1[k]).abs().max().item() / max(1.0, g0[k].abs().max().item()) for k in g0)


@pytest.mark.parametrize("family", PACKING_FAMILIES)
def test_packed_loss_and_gradients_equal_unpacked(family, image_dir):
    loss_diff, grad_diff, loss = _compare(family, image_dir)
    print(f"{family}: loss {loss:.6f}, |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e}")
    assert loss_diff <= TOL and grad_diff <= TOL, (loss_diff, grad_diff)


@pytest.mark.parametrize("attention", ["position_ids", "mask"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_both_attention_paths_with_sdpa_and_eager(family, attn, attention, image_dir):
    loss_diff, grad_diff, loss = _compare(family, image_dir, attn, attention)
    print(f"{family} {attn} {attention}: |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e}")
    assert loss_diff <= TOL and grad_diff <= TOL, (loss_diff, grad_diff)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_comparison_detects_attention_across_samples(family, image_dir):
    """Packed rows with positions running on and one causal mask over the row (what a model
    without packing support would compute) give a loss far from the unpacked one."""
    ad = _tiny(family)
    examples, loader = _examples(ad, image_dir)
    plain = SFTCollator(loader, ad.tokenizer.pad_token_id)(examples)
    packed = SFTCollator(loader, ad.tokenizer.pad_token_id, pack_length=_budget(examples))(examples)
    leaky = Batch({k: v for k, v in packed.tensors.items() if k != "segment_ids"}, packed.images,
                  packed.image_indices, packed.size, packed.image_prompts)
    n = SFTMethod(ad).count_items(plain)
    ref, _, g_ref = _loss_and_grads(ad, plain, n)
    ok, _, g_ok = _loss_and_grads(ad, packed, n)
    bad, _, g_bad = _loss_and_grads(ad, leaky, n)
    assert abs(ok - ref) <= TOL and _grad_diff(g_ref, g_ok) <= TOL
    # the tiny random-init models barely use their context, yet the difference is far above TOL
    print(f"{family}: leaky |loss diff| {abs(bad - ref).item():.2e}, max |grad diff| {_grad_diff(g_ref, g_bad):.2e}")
    assert abs(bad - ref) > 10 * TOL and _grad_diff(g_ref, g_bad) > 100 * TOL


def test_packed_forward_never_keeps_a_cache(image_dir):
    """transformers skips its packed-sequence detection when a cache exists, so a packed forward
    asked for one still attends within samples only (and returns none)."""
    ad = _tiny("llava")
    examples, loader = _examples(ad, image_dir)
    packed = SFTCollator(loader, ad.tokenizer.pad_token_id, pack_length=_budget(examples))(examples)
    t = packed.tensors
    with torch.no_grad():
        enc = packed.encode(ad)
        args = (t["input_ids"], t["attention_mask"])
        kw = dict(encoded=enc, image_indices=packed.image_indices, segment_ids=t["segment_ids"])
        a = ad.forward(*args, **kw, use_cache=True)
        b = ad.forward(*args, **kw, use_cache=False)
    assert ad.kv_cache(a) is None
    assert torch.equal(a.logits, b.logits)


def test_qwen2_vl_packed_positions_are_each_samples_own(image_dir):
    """The (4, B, T) packed positions: text ids restart per sample, and the M-RoPE rows equal
    what the model computes for the sample alone."""
    ad = _tiny("qwen2_vl")
    examples, loader = _examples(ad, image_dir)
    packed = SFTCollator(loader, ad.tokenizer.pad_token_id, pack_length=_budget(examples))(examples)
    t = packed.tensors
    enc = packed.encode(ad)
    mm = ad.mm_kwargs(enc, [i for r in packed.image_indices for i in r])
    pos = ad.packed_inputs(t["input_ids"], t["segment_ids"], mm)["position_ids"]
    assert pos.shape == (4, *t["input_ids"].shape)
    for r in range(t["input_ids"].shape[0]):
        segs = t["segment_ids"][r]
        for k in range(1, int(segs.max()) + 1):
            where = (segs == k).nonzero().flatten()
            a, b = int(where[0]), int(where[-1]) + 1
            ids = t["input_ids"][r:r + 1, a:b]
            assert torch.equal(pos[0, r, a:b], torch.arange(b - a))
            i = next(j for j, e in enumerate(examples) if e.rows["input_ids"] == ids[0].tolist())
            own = ad.position_ids(ids, torch.ones_like(ids), encoded=ad.encode_images(
                [loader.inputs(x) for x in examples[i].images]) if examples[i].images else None,
                image_indices=[list(range(len(examples[i].images)))])
            assert torch.equal(pos[1:, r, a:b], own[-3:, 0]), (r, k)


# ----------------------------------------------------------------------------- refusals
def test_a_sample_over_the_pack_budget_is_refused_not_cut(image_dir):
    ad = _tiny("llava")
    examples, loader = _examples(ad, image_dir)
    longest = max(range(len(examples)), key=lambda i: len(examples[i].rows["input_ids"]))
    n = len(examples[longest].rows["input_ids"])
    collate = SFTCollator(loader, ad.tokenizer.pad_token_id, pack_length=n - 1)
    with pytest.raises(LengthError) as err:
        collate(examples)
    msg = str(err.value)
    assert f"pack.json: record {longest}:" in msg and f"sample is {n} tokens" in msg
    assert "image" in msg and "data.pack_length" in msg and "never cuts" in msg
    # exactly at the budget it fits, alone in its row, whole
    batch = SFTCollator(loader, ad.tokenizer.pad_token_id, pack_length=n)(examples)
    assert batch.tensors["input_ids"].shape[1] == n


def test_pack_length_below_max_length_is_refused():
    cfg = load_config(SFTConfig, None, ["data.packing=true", "data.max_length=512", "data.pack_length=256"])
    with pytest.raises(ConfigError, match=r"data.pack_length \(256\) is below data.max_length \(512\)"):
        validate_config(cfg)
    ok = load_config(SFTConfig, None, ["data.packing=true", "data.max_length=512"])
    validate_config(ok)
    assert ok.data.pack_budget == 512
    assert load_config(SFTConfig, None, ["data.max_length=512"]).data.pack_budget is None
    assert load_config(SFTConfig, None, ["data.packing=true", "data.pack_length=2048"]).data.pack_budget == 2048


# ----------------------------------------------------------------------------- a whole run
def _run(root, tmp, packing: bool, family: str | None = None, lora: bool = False):
    over = ["lora.enabled=true", "lora.r=4"] if lora else []
    over += [f"data.train_file={root / 'data' / 'vqa_train.json'}", "data.max_length=256",
             f"data.eval_file={root / 'data' / 'vqa_eval.json'}", "data.max_eval_samples=6",
            "train.batch_size=4", "train.grad_accum=2", "train.max_steps=3", "train.progress=false",
            "train.precision=fp32", "optim.lr=1e-3", "optim.warmup_steps=0", "model.dtype=fp32",
            f"train.output_dir={tmp / ('packed' if packing else 'plain')}", f"data.packing={str(packing).lower()}"]
    over += [f"model.tiny={family}"] if family else [f"model.path={root / 'model'}"]
    if packing:
        over.append("data.pack_length=600")
    cfg = load_config(SFTConfig, None, over)
    result, adapter = train_sft(cfg)
    rows = [json.loads(line) for line in (tmp / ('packed' if packing else 'plain') / "metrics.jsonl").read_text()
            .splitlines()]
    return rows, {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}


@pytest.mark.parametrize("family,lora", [(None, False), (None, True), ("qwen2_vl", False)],
                         ids=["llava", "llava-lora", "qwen2_vl"])
def test_a_packed_run_equals_the_unpacked_run(shapes_llava, tmp_path, family, lora, monkeypatch):
    plain, w0 = _run(shapes_llava, tmp_path, False, family, lora)
    shapes = []
    original = SFTCollator._packed

    def spy(self, examples):
        batch = original(self, examples)
        shapes.append((len(examples), tuple(batch.tensors["input_ids"].shape)))
        return batch

    monkeypatch.setattr(SFTCollator, "_packed", spy)
    packed, w1 = _run(shapes_llava, tmp_path, True, family, lora)
    # 3 steps x 2 micro-batches of 4 samples and the evaluation's 2 batches (4 + 2 samples), each
    # packed into fewer rows than samples
    assert len(shapes) == 8 and all(rows < n for n, (rows, _) in shapes), shapes
    steps = [r for r in plain if "train/loss" in r]
    assert len(steps) == 3
    packed_steps = [r for r in packed if "train/loss" in r]
    for a, b in zip(steps, packed_steps):
        assert a["train/items"] == b["train/items"] > 0
        assert abs(a["train/loss"] - b["train/loss"]) <= TOL
        assert abs(a["train/grad_norm"] - b["train/grad_norm"]) <= 1e-4
    # the final evaluation's loss (data.eval_file, packed the same way) agrees too
    (e0,), (e1,) = ([r["eval/loss"] for r in rows if "eval/loss" in r] for rows in (plain, packed))
    assert abs(e0 - e1) <= TOL, (e0, e1)
    worst = max((w0[k].float() - w1[k].float()).abs().max().item() for k in w0)
    print(f"{family or 'llava'}{' lora' if lora else ''} run: max |loss diff| "
          f"{max(abs(a['train/loss'] - b['train/loss']) for a, b in zip(steps, packed_steps)):.2e}, "
          f"max |grad norm diff| {max(abs(a['train/grad_norm'] - b['train/grad_norm']) for a, b in zip(steps, packed_steps)):.2e}, "
          f"max |weight diff| {worst:.2e}")
    assert worst <= 1e-5, worst


def test_a_family_that_cannot_pack_is_refused_with_its_reason(image_dir):
    ad = _tiny("llava")
    ad.packing_refused = "its image tokens are placed by the model, not in the rows"
    examples, loader = _examples(ad, image_dir)
    packed = SFTCollator(loader, ad.tokenizer.pad_token_id, pack_length=_budget(examples))(examples)
    from vlmalign.errors import ModelError
    with pytest.raises(ModelError, match="llava: data.packing is not supported: its image tokens"):
        SFTMethod(ad).compute_loss(packed, 1)


@pytest.mark.parametrize("family", REFUSED_FAMILIES)
def test_families_whose_attention_spans_the_row_refuse_packing(family):
    from vlmalign.errors import ModelError
    with pytest.raises(ModelError, match=f"{family}: data.packing is not supported"):
        _tiny(family).check_packing()
