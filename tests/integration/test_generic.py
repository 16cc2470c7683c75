"""The generic fallback adapter (models/generic.py), the one any model_type without an adapter of
its own gets, on a tiny random-init VipLLaVA (``vipllava``: a CLIP tower whose projector reads
several of its layers, a Llama decoder, transformers' LlavaProcessor). It goes through the family
contract and training-step tests of test_families.py and test_compose.py through this module's
``tiny`` fixture; test_dpo.py, test_reward_model.py and test_sft_packing.py build it by the name
``generic`` (tiny_kinds.py)."""

from __future__ import annotations

import pytest

from vlmalign.models import adapter_for, load_adapter
from vlmalign.models.generic import GenericAdapter

from tiny_kinds import build_tiny_generic

# the family contract and one step of SFT, LoRA SFT and GRPO, run here on the generic model
from test_compose import test_sft_step_trains_the_projector_and_language_model  # noqa: F401
from test_families import (test_chat_template_renders_placeholders, test_generation_runs,  # noqa: F401
                           test_grpo_step_samples_rollouts_and_updates_the_policy,
                           test_length_limit_never_cuts_image_tokens,
                           test_lora_sft_step_trains_the_adapters_and_keeps_the_base, test_loss_only_on_assistant_turns,
                           test_one_encoding_serves_many_rows, test_param_groups_and_lora_targets,
                           test_placeholder_mismatch_is_an_error, test_precomputed_features_equal_pixel_values,
                           test_reload_with_plain_transformers_and_loader, test_text_only_record_and_mixed_batch,
                           test_token_ids_match_processor)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, processor = build_tiny_generic()
    out = tmp_path_factory.mktemp("generic")
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    ad = load_adapter(str(out))
    ad.model.eval()
    return "generic", ad, out


def test_the_model_type_has_no_adapter_of_its_own(tiny):
    _, ad, _ = tiny
    assert ad.model.config.model_type == "vipllava" and type(ad) is GenericAdapter
    assert type(adapter_for(*build_tiny_generic())) is GenericAdapter
    groups = ad.param_groups()
    assert {n.split(".")[1] for n, _ in groups["vision"]} == {"vision_tower"}
    assert {n.split(".")[1] for n, _ in groups["projector"]} == {"multi_modal_projector"}
