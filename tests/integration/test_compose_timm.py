"""timm vision towers in `vlmalign models compose`: tiny random timm CNNs, one saved as a transformers
TimmWrapper directory and one as timm itself saves a checkpoint (``architecture`` +
``pretrained_cfg``, with its ImageNet head), composed into transformers' FastVLM class, and a tiny
timm ViT composed as our vlmalign_timm_vit tower in a resampler model; saved, reloaded, put through the family contract tests of test_families.py and trained with `train
pretrain` and `train sft`; the tiny ``fast_vlm`` and ``timm_vit`` kinds (tiny_kinds.py) through the DPO encode-once
and prefix-sharing, reward-model, packing and FSDP2 tests; the tower's features equal timm's own;
the refusals.

These tests need timm, which needs torchvision: they run in the side environment of timm_env.py,
which test_timm_side_env.py starts; in the main environment this module is skipped.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from timm_env import INNER, allow_torchvision_without_ops

if not os.environ.get(INNER):
    pytest.skip("needs timm: runs in the timm side environment that test_timm_side_env.py starts",
                allow_module_level=True)
allow_torchvision_without_ops()
import timm  # noqa: E402
from timm.models._hub import save_for_hf  # noqa: E402

from vlmalign.cli.main import main  # noqa: E402
from vlmalign.errors import ModelError  # noqa: E402
from vlmalign.models import load_adapter  # noqa: E402
from vlmalign.models.compose import ComposeOptions, compose  # noqa: E402

# the family contract, run here on composed timm models through this module's ``tiny`` fixture
import test_dpo  # noqa: E402
import test_fsdp2  # noqa: E402
import test_reward_model  # noqa: E402
import test_sft_packing  # noqa: E402
from test_compose import (_llm, pretrain_then_lora_sft,  # noqa: E402,F401
                          test_sft_step_trains_the_projector_and_language_model)
from test_dpo import world  # noqa: E402,F401   (fixtures of the method tests run below)
from test_sft_packing import image_dir  # noqa: E402,F401
from test_families import (test_chat_template_renders_placeholders, test_generation_runs,  # noqa: E402,F401
                           test_grpo_step_samples_rollouts_and_updates_the_policy,
                           test_length_limit_never_cuts_image_tokens,
                           test_lora_sft_step_trains_the_adapters_and_keeps_the_base, test_loss_only_on_assistant_turns,
                           test_one_encoding_serves_many_rows, test_param_groups_and_lora_targets,
                           test_precomputed_features_equal_pixel_values, test_reload_with_plain_transformers_and_loader,
                           test_text_only_record_and_mixed_batch, test_token_ids_match_processor)


def _wrapper_dir(architecture: str, path, **model_args) -> str:
    """A random-init timm model saved by transformers' TimmWrapperModel (model_type timm_wrapper)."""
    from transformers import TimmWrapperConfig, TimmWrapperModel
    torch.manual_seed(0)
    TimmWrapperModel(TimmWrapperConfig(architecture=architecture, model_args=model_args or None)).eval().save_pretrained(
        path)
    return str(path)


def _timm_dir(architecture: str, path) -> str:
    """A random-init timm model saved as timm saves one for the hub: config.json with
    ``architecture``, ``pretrained_cfg`` and ``model_args`` (num_classes 1000), its ImageNet head in
    model.safetensors. BatchNorm running statistics are made non-trivial, so that a tower that
    ignored them would not match."""
    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    save_for_hf(model.eval(), str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm_parts")
    vision = {"efficientnet": _wrapper_dir("test_efficientnet", root / "efficientnet"),
              "resnet": _timm_dir("test_resnet", root / "resnet"),
              "vit": _wrapper_dir("test_vit", root / "vit")}
    return vision, {k: _llm(k, root / k) for k in ("llama", "qwen2")}


# (vision, llm, projector, options): the CNNs in both layouts as FastVLM with both projectors it
# holds, both LMs; the ViT as our vlmalign_timm_vit tower in a Q-Former resampler model
COMBOS = [("efficientnet", "llama", "mlp2x_gelu", ["--image-size", "64"]), ("resnet", "qwen2", "linear", []),
          ("vit", "llama", "qformer", ["--num-query-tokens", "6"])]


@pytest.fixture(scope="module", params=COMBOS, ids=["-".join(c[:3]) for c in COMBOS])
def tiny(request, parts, tmp_path_factory):
    vision, llm, projector, options = request.param
    out = tmp_path_factory.mktemp("composed")
    assert main(["models", "compose", "--vision", parts[0][vision], "--llm", parts[1][llm], "--projector", projector,
                 *options, "--out", str(out)]) == 0
    ad = load_adapter(str(out))
    ad.model.eval()
    return f"{vision}+{llm}+{projector}", ad, out


def test_the_tower_gives_timms_own_features(parts, tmp_path):
    """A timm checkpoint directory composes as FastVLM; its tower's feature map equals timm's own
    model loaded from the same file, each image gives (size / stride)^2 tokens, and its BatchNorm
    layers keep their running statistics when the model trains."""
    out = compose(parts[0]["resnet"], parts[1]["llama"], str(tmp_path / "m"))
    ad = load_adapter(out)
    assert ad.model.config.model_type == "fast_vlm" and ad.family == "fast_vlm"
    record = json.loads((tmp_path / "m" / "vlmalign_compose.json").read_text())
    assert record["vision_model_type"] == "timm_wrapper"
    own = timm.create_model("test_resnet", pretrained=True,
                            pretrained_cfg_overlay={"file": os.path.join(parts[0]["resnet"], "model.safetensors")}).eval()
    size = own.pretrained_cfg["input_size"][-1]
    pixels = torch.randn(2, 3, size, size)
    tower = ad.model.model.vision_tower
    with torch.no_grad():
        want = own.forward_features(pixels)
        assert torch.allclose(tower(pixels).last_hidden_state, want, atol=1e-5)
        ad.model.train()   # BatchNorm stays in eval: the same features in training mode
        assert torch.allclose(tower(pixels).last_hidden_state, want, atol=1e-5)
        assert not any(m.training for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert ad.model.model.multi_modal_projector.training
    side = size // 32   # test_resnet's stride
    from PIL import Image
    assert ad.preprocess_image(Image.new("RGB", (90, 70), "red")).num_features == side * side
    # the tower's weights are the file's (without its ImageNet head)
    src = {k: v for k, v in own.state_dict().items() if not k.startswith("fc.")}
    got = {k.removeprefix("timm_model."): v for k, v in tower.state_dict().items()}
    assert got.keys() == src.keys() and all(torch.equal(got[k], src[k]) for k in src)


def test_train_pretrain_and_sft_on_a_composed_timm_model(parts, shapes_llava, tmp_path):
    model = compose(parts[0]["efficientnet"], parts[1]["qwen2"], str(tmp_path / "m"), ComposeOptions(image_size=64))
    pretrain_then_lora_sft(model, shapes_llava, tmp_path)


def test_a_timm_vit_tower_gives_its_blocks_tokens(parts, tmp_path):
    """A timm ViT composes as a plain LLaVA holding our vlmalign_timm_vit tower: the projector reads
    the penultimate block's patch tokens (CLS dropped) exactly as timm computes them, each image
    gives (size / patch)^2 tokens, and plain transformers reloads it (vlmalign.models imported).
    With AlignGPT's levels it becomes a vlmalign_aligngpt model around the same tower."""
    from transformers import AutoModelForImageTextToText
    out = compose(parts[0]["vit"], parts[1]["llama"], str(tmp_path / "m"))
    ad = load_adapter(out)
    cfg = ad.model.config
    assert (cfg.model_type, cfg.vision_config.model_type, ad.family) == ("llava", "vlmalign_timm_vit", "llava")
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "full")
    own = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    own.load_state_dict({k.removeprefix("timm_model."): v for k, v in ad.model.model.vision_tower.state_dict().items()})
    pixels = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        blocks = own.forward_intermediates(pixels, output_fmt="NLC", intermediates_only=True)
        want = ad.model.model.multi_modal_projector(blocks[-2])
        got = ad.model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                                vision_feature_select_strategy="full").pooler_output
    assert blocks[-2].shape == (2, 100, 64)
    assert torch.allclose(torch.stack(list(got)), want, atol=1e-5)
    from PIL import Image
    assert ad.preprocess_image(Image.new("RGB", (90, 70), "red")).num_features == 100   # 160 px, patch 16
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert type(reloaded.model.vision_tower).__name__ == "TimmViTModel"
    levels = compose(parts[0]["vit"], parts[1]["llama"], str(tmp_path / "a"), ComposeOptions(alignment_levels=4))
    assert load_adapter(levels).model.config.model_type == "vlmalign_aligngpt"
    # a ViT built at another size than its pretrained_cfg's (model_args img_size) takes its own size
    small = compose(_wrapper_dir("test_vit", tmp_path / "small", img_size=64), parts[1]["llama"], str(tmp_path / "s"))
    assert load_adapter(small).preprocess_image(Image.new("RGB", (90, 70), "red")).num_features == 16


def test_timm_refusals_name_the_reason(parts, tmp_path):
    llm = parts[1]["llama"]
    with pytest.raises(ModelError, match="FastVLM class, which holds a linear or mlp2x_gelu projector .*perceiver"):
        compose(parts[0]["efficientnet"], llm, str(tmp_path / "a"), ComposeOptions(projector="perceiver"))
    with pytest.raises(ModelError, match="no alignment levels"):
        compose(parts[0]["efficientnet"], llm, str(tmp_path / "a"), ComposeOptions(alignment_levels=8))
    with pytest.raises(ModelError, match="its last feature map .*only -1"):
        compose(parts[0]["efficientnet"], llm, str(tmp_path / "a"), ComposeOptions(vision_feature_layer=-2))
    with pytest.raises(ModelError, match="has none: use full"):
        compose(parts[0]["efficientnet"], llm, str(tmp_path / "a"), ComposeOptions(select_strategy="default"))
    with pytest.raises(ModelError, match="blocks' outputs only, counted from the end"):
        compose(parts[0]["vit"], llm, str(tmp_path / "a"), ComposeOptions(vision_feature_layer=3))
    with pytest.raises(ModelError, match="position embeddings fix its input at 160 px"):
        compose(parts[0]["vit"], llm, str(tmp_path / "a"), ComposeOptions(image_size=64))


# ------------------------------------------------------------ the method tests, on the tiny kinds
KINDS = ["fast_vlm", "timm_vit"]


@pytest.mark.parametrize("kind", KINDS)
def test_dpo_encode_once_equals_the_pixel_path(world, kind):
    test_dpo.test_dpo_step_equals_the_pixel_path(world, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_dpo_prefix_sharing_equals_unshared_loss_and_gradients(world, kind):
    test_dpo.test_prefix_sharing_equals_unshared_loss_and_gradients(world, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_reward_model_scalar_head_reads_the_last_real_token(kind):
    test_reward_model.test_scalar_head_reads_the_last_real_token_for_every_family(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_loss_and_gradients_equal_unpacked(image_dir, kind):
    test_sft_packing.test_packed_loss_and_gradients_equal_unpacked(kind, image_dir)


@pytest.fixture(scope="module")
def sharded(shapes_llava, tmp_path_factory):
    """A one-step full SFT run (the tower trained too) of each tiny kind, sharded over two
    processes, in one launch."""
    from tiny_kinds import build_kind
    for kind in KINDS:
        torch.manual_seed(0)
        model, processor = build_kind(kind)
        model.save_pretrained(shapes_llava / kind, safe_serialization=True)
        processor.save_pretrained(shapes_llava / kind)
        test_fsdp2.RUNS[f"sft-{kind}"] = test_fsdp2.family_run(kind, saved=True)
    root = tmp_path_factory.mktemp("fsdp2")
    test_fsdp2.launch_sharded(shapes_llava, root, [f"sft-{kind}" for kind in KINDS])
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_two_sharded_processes_match_one(sharded, shapes_llava, tmp_path, kind):
    test_fsdp2.two_sharded_processes_match_one(sharded, shapes_llava, tmp_path, f"sft-{kind}")
