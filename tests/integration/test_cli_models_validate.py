"""`vlmalign models` and `vlmalign data validate --model` on real tiny model directories, plus the
training-time refusals: corrupt images, QLoRA without CUDA, custom code without
trust_remote_code, pickle-only weights; and gradient checkpointing leaving the loss unchanged.

Every tiny directory is written once per module through the CLI (`models tiny FAMILY --out DIR`).
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from vlmalign.cli.main import main
from vlmalign.config import load_config
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.errors import DataError, ModelError
from vlmalign.methods.setup import build_adapter
from vlmalign.methods.sft import SFTConfig, train_sft
from vlmalign.models import build_tiny, families, load_adapter

FAMILIES = families()
# the families the docs promise; a family silently dropping out of the registry fails here
EXPECTED = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "instructblip",
            "gemma3", "qwen3_vl", "internvl", "mllama"}
TIED_HEAD = {"paligemma", "gemma3"}   # output head tied to the embeddings: an empty head group
# images read through cross-attention: one image token in the text, the features beside it
CROSS_ATTENTION = {"mllama"}


def _image_tokens(family, item) -> int:
    """How many image-token ids one image puts into the sequence."""
    return 1 if family in CROSS_ATTENTION else item.num_features


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> directory written by `vlmalign models tiny FAMILY --out DIR`."""
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for fam in FAMILIES:
        d = root / fam
        rc, out, _ = run_cli("models", "tiny", fam, "--out", str(d))
        assert rc == 0 and f"wrote tiny {fam} model to {d}" in out
        dirs[fam] = d
    return dirs


# ---------------------------------------------------------------------- models tiny / list / info
def test_models_list_names_every_family():
    rc, out, _ = run_cli("models", "list")
    assert rc == 0
    assert out.split() == FAMILIES
    assert EXPECTED <= set(FAMILIES)


def test_models_tiny_unknown_family_is_refused(tmp_path):
    rc, _, err = run_cli("models", "tiny", "no_such_family", "--out", str(tmp_path / "x"))
    assert rc == 2
    assert "no tiny builder for 'no_such_family'" in err and "llava" in err
    assert not (tmp_path / "x").exists()


def test_models_tiny_init_std(tmp_path):
    """--init-std reaches the language model's initializer (the quickstart's 0.125) and is
    refused, naming the family, where the tiny builder has no such option."""
    import json
    rc, _, _ = run_cli("models", "tiny", "llava", "--out", str(tmp_path / "a"), "--init-std", "0.125")
    assert rc == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["text_config"]["initializer_range"] == 0.125
    from safetensors.torch import load_file
    w = load_file(str(tmp_path / "a" / "model.safetensors"))
    emb = next(v for k, v in w.items() if k.endswith("embed_tokens.weight"))
    assert 0.1 < float(emb.std()) < 0.15          # 0.02 without the option
    rc, _, err = run_cli("models", "tiny", "qwen2_vl", "--out", str(tmp_path / "b"), "--init-std", "0.1")
    assert rc == 2 and "tiny qwen2_vl builder has no init_std option" in err
    assert not (tmp_path / "b").exists()


def test_models_tiny_vision_feature_layer_reads_the_patch_embeddings(tmp_path):
    """--vision-feature-layer 0 (the quickstart's) makes the projector read the tower's patch
    embeddings: the features equal the projector applied to hidden state 0, not to the last layer.
    Out-of-range layers and families without the option are refused, naming them."""
    import json

    import torch
    from PIL import Image

    from vlmalign.models import load_adapter
    rc, _, _ = run_cli("models", "tiny", "llava", "--out", str(tmp_path / "a"), "--vision-feature-layer", "0")
    assert rc == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["vision_feature_layer"] == -3
    ad = load_adapter(str(tmp_path / "a"))
    img = ad.preprocess_image(Image.new("RGB", (64, 64), "red"))
    with torch.no_grad():
        feats = ad.encode_images([img]).features[0]
        hs = ad.model.model.vision_tower(img.tensors["pixel_values"], output_hidden_states=True).hidden_states
        proj = ad.model.model.multi_modal_projector
        assert torch.allclose(feats, proj(hs[0][:, 1:])[0], atol=1e-6)
        assert not torch.allclose(feats, proj(hs[-1][:, 1:])[0], atol=1e-3)
    rc, _, err = run_cli("models", "tiny", "llava", "--out", str(tmp_path / "b"), "--vision-feature-layer", "3")
    assert rc == 2 and "vision_feature_layer 3: the tower has 2 layers" in err
    rc, _, err = run_cli("models", "tiny", "qwen2_vl", "--out", str(tmp_path / "c"), "--vision-feature-layer", "0")
    assert rc == 2 and "tiny qwen2_vl builder has no vision_feature_layer option" in err


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_dir_reloads_with_transformers_and_load_adapter(tiny_dirs, family):
    d = tiny_dirs[family]
    files = {p.name for p in d.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    # the saved weights are the builder's (same seed), read back by plain transformers
    built, _ = build_tiny(family, seed=0)
    hf = AutoModelForImageTextToText.from_pretrained(str(d))
    assert type(hf) is type(built)
    assert hf.config.model_type == built.config.model_type
    ref = built.state_dict()
    got = hf.state_dict()
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(got[k], v), k

    ad = load_adapter(str(d))
    assert ad.family == family
    for k, v in ad.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # the reloaded processor and model fit together: one image through encode-once forward
    img = Image.new("RGB", (64, 64), (30, 70, 220))
    item = ad.preprocess_image(img)
    from vlmalign.data.schema import ImageRef, Message
    prompt = [Message.user(ImageRef(path="x.png"), "What colour is it?")]
    tok = ad.tokenize_prompt(prompt, [item])
    assert tok.image_token_counts == [item.num_tokens] and item.num_tokens > 0
    assert sum(t == ad.image_token_id for t in tok.input_ids) == _image_tokens(family, item)
    enc = ad.encode_images([item], prompts=[prompt])
    ids = torch.tensor([tok.input_ids])
    with torch.no_grad():
        logits = ad.forward(ids, torch.ones_like(ids), encoded=enc, image_indices=[[0]]).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_models_info_json(tiny_dirs, family):
    rc, out, _ = run_cli("models", "info", str(tiny_dirs[family]), "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["family"] == family
    assert info["model_type"] == family
    for group in ("vision", "projector", "language"):
        assert info["parameters"][group] > 0, group
    # PaliGemma and Gemma 3 tie their output head to the embeddings: counted once, under language
    assert (info["parameters"]["head"] == 0) == (family in TIED_HEAD)
    assert info["lora_targets"] > 0
    ad = load_adapter(str(tiny_dirs[family]))
    want = {g: sum(p.numel() for _, p in ps) for g, ps in ad.param_groups().items()}
    assert info["parameters"] == want
    assert sum(want.values()) == sum(p.numel() for p in ad.model.parameters())


# ---------------------------------------------------------------------- data validate --model
MAX_LEN = 128
# families that put every image before the text, wherever the placeholder is
IMAGES_FIRST = {"instructblip", "paligemma"}
LONG_PROMPT = "What colour is the circle in the top left? " * 30  # ~ 300 text tokens


def _rec(image, question, answer="red"):
    return {"image": image, "conversations": [{"from": "human", "value": question},
                                              {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def val_file(tmp_path_factory) -> tuple[Path, Path]:
    """(data file, image root): record 0 fits, 1 is too long (its image comes after the long
    text, so cutting at MAX_LEN would cut image tokens), 2 has a corrupt PNG, 3 a missing image."""
    root = tmp_path_factory.mktemp("validate")
    img = root / "img"
    img.mkdir()
    Image.new("RGB", (64, 64), (220, 30, 30)).save(img / "ok.png")
    (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"these are garbage bytes, not an image" * 8)
    f = root / "data.json"
    f.write_text(json.dumps([
        _rec("ok.png", "<image>\nWhat colour is the circle?"),
        _rec("ok.png", LONG_PROMPT + "\n<image>"),
        _rec("corrupt.png", "<image>\nWhat colour is the circle?"),
        _rec("missing.png", "<image>\nWhat colour is the circle?"),
    ]))
    return f, img


@pytest.mark.parametrize("family", FAMILIES)
def test_validate_with_real_model_reports_length_corrupt_and_missing(tiny_dirs, val_file, family):
    f, img = val_file
    model = str(tiny_dirs[family])
    rc, out, err = run_cli("data", "validate", str(f), "--image-root", str(img), "--model", model,
                           "--max-length", str(MAX_LEN))
    assert rc == 1, err
    lines = out.splitlines()
    assert not any(line.startswith(f"{f}: record 0:") for line in lines), out  # it fits
    by_index = {i: [ln for ln in lines if ln.startswith(f"{f}: record {i}:")] for i in (1, 2, 3)}
    assert all(len(v) == 1 for v in by_index.values()), out
    (too_long,), (corrupt,), (missing,) = by_index.values()
    assert "field 'length'" in too_long and f"over max_length {MAX_LEN}" in too_long
    assert "would drop image or response tokens" in too_long
    assert "field 'images[0]'" in corrupt and "corrupt or unreadable image" in corrupt and "corrupt.png" in corrupt
    assert "field 'images[0]'" in missing and "image file not found: 'missing.png'" in missing
    assert lines[-1] == "4 records, 3 bad"

    # the premise: record 0 fits MAX_LEN, and cutting record 1 there would cut its image tokens
    ad = load_adapter(model)
    from vlmalign.data.readers import iter_records
    recs = [r for _, r in iter_records(str(f))]
    items = [ad.preprocess_image(Image.open(img / "ok.png").convert("RGB"))]
    assert len(ad.tokenize_record(recs[0], items)) <= MAX_LEN
    long_ids = ad.tokenize_record(recs[1], items).input_ids
    assert len(long_ids) > MAX_LEN
    image_pos = [i for i, t in enumerate(long_ids) if t == ad.image_token_id]
    assert len(image_pos) == _image_tokens(family, items[0])
    if family in IMAGES_FIRST:  # the answer would be cut instead
        assert max(image_pos) < MAX_LEN
    else:
        assert max(image_pos) >= MAX_LEN


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_validate_with_real_model_json_report(tiny_dirs, val_file, family):
    f, img = val_file
    rc, out, _ = run_cli("data", "validate", str(f), "--image-root", str(img), "--model",
                         str(tiny_dirs[family]), "--max-length", str(MAX_LEN), "--json")
    assert rc == 1
    rep = json.loads(out)
    assert rep["records"] == 4 and rep["bad"] == 3 and rep["ok"] is False
    assert [(p["index"], p["field"]) for p in rep["problems"]] == [
        (1, "length"), (2, "images[0]"), (3, "images[0]")]
    # with room for the long record, only the image problems remain
    rc, out, _ = run_cli("data", "validate", str(f), "--image-root", str(img), "--model",
                         str(tiny_dirs[family]), "--max-length", "4096", "--json")
    assert rc == 1
    assert [p["index"] for p in json.loads(out)["problems"]] == [2, 3]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_validate_reports_an_image_the_processor_refuses(tiny_dirs, tmp_path, family):
    """Qwen2-VL's image processor raises ValueError for an aspect ratio over 200; validate must
    name the record, not die with a traceback. LLaVA resizes such an image and accepts it."""
    Image.new("RGB", (1000, 2), (220, 30, 30)).save(tmp_path / "thin.png")
    Image.new("RGB", (64, 64), (220, 30, 30)).save(tmp_path / "ok.png")
    f = tmp_path / "data.json"
    f.write_text(json.dumps([_rec("ok.png", "<image>\nWhat colour?"), _rec("thin.png", "<image>\nWhat colour?")]))
    rc, out, _ = run_cli("data", "validate", str(f), "--model", str(tiny_dirs[family]), "--max-length", "512")
    if family.startswith("qwen"):
        assert rc == 1
        (line,) = [ln for ln in out.splitlines() if ln.startswith(f"{f}:")]
        assert line.startswith(f"{f}: record 1: field 'model': the model cannot process this record")
        assert "aspect ratio" in line
        assert out.splitlines()[-1] == "2 records, 1 bad"
    else:
        assert rc == 0 and out.splitlines() == ["2 records, 0 bad"]


# ---------------------------------------------------------------------- training refusals
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate_shapesworld(root, ShapesConfig(seed=1, train_images=4, eval_images=2))
    return root


def _sft_cfg(train_file, out, *extra):
    return load_config(SFTConfig, None, [
        "model.tiny=llava", f"data.train_file={train_file}", "data.max_length=256",
        f"train.output_dir={out}", "train.max_steps=1", "train.batch_size=2", "train.progress=false",
        "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant", *extra])


@pytest.fixture
def corrupt_world(world, tmp_path) -> tuple[Path, int, int, int]:
    """A copy of the world whose images/train_00001.png is garbage bytes.
    Returns (vqa_train.json, first record using it, records using it, all records)."""
    data = tmp_path / "data"
    shutil.copytree(world, data)
    (data / "images" / "train_00001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 64)
    train = data / "vqa_train.json"
    recs = json.loads(train.read_text())
    using = [i for i, r in enumerate(recs) if r["image"] == "images/train_00001.png"]
    assert 0 < len(using) < len(recs)
    return train, using[0], len(using), len(recs)


def test_training_refuses_a_corrupt_image(corrupt_world, tmp_path):
    train, first, _, _ = corrupt_world
    with pytest.raises(DataError) as ei:
        train_sft(_sft_cfg(train, tmp_path / "run"))
    msg = str(ei.value)
    assert msg.startswith(f"{train}: record {first}: ")
    assert "corrupt" in msg and "train_00001.png" in msg
    assert ei.value.index == first and ei.value.file == str(train)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_skips_a_corrupt_image_when_asked(corrupt_world, tmp_path, caplog):
    train, first, n_bad, total = corrupt_world
    result, _ = train_sft(_sft_cfg(train, tmp_path / "run", "data.on_error=skip"))
    assert result.step == 1
    out = caplog.text
    assert f"skipped {n_bad} of {total} records" in out
    assert f"record {first}:" in out and "corrupt" in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["train/loss"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_qlora_without_cuda_is_a_clear_model_error(world, tmp_path):
    cfg = _sft_cfg(world / "vqa_train.json", tmp_path / "run", "lora.enabled=true", "lora.qlora=true")
    with pytest.raises(ModelError, match="QLoRA needs a CUDA GPU") as ei:
        train_sft(cfg)
    assert "no CUDA device" in str(ei.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _first_losses_and_layer_calls(world, out, *extra):
    cfg = _sft_cfg(world / "vqa_train.json", out, "train.max_steps=2", *extra)
    ad = build_adapter(cfg.model, seed=cfg.train.seed)
    calls = []
    # a submodule of a decoder layer: checkpointing wraps the layer's forward, so the backward pass
    # enters it again (a pre-hook: the recompute stops early, once the saved tensors are rebuilt)
    ad.model.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    train_sft(cfg, adapter=ad)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows], len(calls), ad


def test_gradient_checkpointing_gives_the_same_losses(world, tmp_path):
    plain, calls_plain, ad_plain = _first_losses_and_layer_calls(world, tmp_path / "plain")
    ckpt, calls_ckpt, ad_ckpt = _first_losses_and_layer_calls(world, tmp_path / "ckpt",
                                                              "model.gradient_checkpointing=true")
    assert not ad_plain.model.is_activation_checkpointing and ad_ckpt.model.is_activation_checkpointing
    # checkpointing really ran: every decoder layer forward is recomputed in the backward pass
    assert calls_plain == 2 and calls_ckpt == 2 * calls_plain
    assert len(plain) == len(ckpt) == 2
    assert abs(plain[0] - ckpt[0]) <= 1e-6
    # same gradients -> same update -> same second loss (up to float reassociation)
    assert abs(plain[1] - ckpt[1]) <= 1e-5
    for (n, p), (_, q) in zip(ad_plain.model.named_parameters(), ad_ckpt.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


# ---------------------------------------------------------------------- loading policy
CUSTOM_CODE = "from pathlib import Path\nPath({marker!r}).write_text('custom code ran')\n"


def _custom_code_dir(tiny_dirs, tmp_path, model_type: str) -> tuple[Path, Path]:
    d = tmp_path / f"custom_{model_type}"
    shutil.copytree(tiny_dirs["llava"], d)
    marker = tmp_path / "custom_code_ran"
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForImageTextToText": "modeling_evil.EvilForConditionalGeneration"}
    (d / "config.json").write_text(json.dumps(cfg))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (d / name).write_text(CUSTOM_CODE.format(marker=str(marker)))
    return d, marker


def test_custom_code_is_refused_without_trust_remote_code(tiny_dirs, tmp_path):
    d, marker = _custom_code_dir(tiny_dirs, tmp_path, "evil_vlm")
    runpy.run_path(str(d / "modeling_evil.py"))  # the marker works: running the code writes it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ModelError) as ei:
        load_adapter(str(d))
    msg = str(ei.value)
    assert "needs custom code" in msg and "it was not run" in msg and "trust_remote_code=True" in msg
    assert not marker.exists()
    rc, _, err = run_cli("models", "info", str(d))
    assert rc == 2 and "--trust-remote-code" in err and "needs custom code" in err
    assert not marker.exists()


def test_auto_map_on_a_known_model_type_loads_the_builtin_class(tiny_dirs, tmp_path):
    d, marker = _custom_code_dir(tiny_dirs, tmp_path, "llava")
    ad = load_adapter(str(d))
    assert type(ad.model).__module__.startswith("transformers.models.llava.")
    assert not marker.exists()


def test_pickle_only_weights_are_refused(tiny_dirs, tmp_path):
    d = tmp_path / "bin_only"
    shutil.copytree(tiny_dirs["llava"], d)
    weights = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(weights, d / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"has no \.safetensors weights; vlmalign loads safetensors only"):
        load_adapter(str(d))
    rc, _, err = run_cli("models", "info", str(d))
    assert rc == 2 and "safetensors only" in err
    # the explicit opt-in reads them through transformers' weights-only torch.load
    got = load_adapter(str(d), allow_pickle=True).model.state_dict()
    want = load_adapter(str(tiny_dirs["llava"])).model.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
