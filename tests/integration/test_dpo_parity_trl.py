"""Parity of our DPO with TRL 1.16's ``DPOTrainer`` on a tiny LLaVA and ShapesWorld pairs.

Both sides get the same random-init weights (fp32, CPU): a policy whose language model is moved
away from the reference (so the loss is not trivially log 2), and the reference itself (TRL's
``ref_model``, our frozen separate reference). The processor is loaded from a local directory.

* **Batches.** TRL's own vision collator (``DataCollatorForVisionPreference``, built by
  ``DPOTrainer``) turns conversational records into flush-left ``[prompt | completion]`` rows,
  chosen rows first. Our pipeline (``load_pairs`` on the plain-DPO file, ``PreferenceCollator``)
  keeps one prompt per pair and the completions apart; per row, the prompt ids and completion
  ids are checked equal to TRL's (each completion ends with EOS on both sides).
* **Loss and gradients.** ``DPOTrainer.compute_loss(model, inputs)`` (TRL's fused LM head, its
  reference forward) against ``DPOMethod.compute_loss`` with every optimisation on (each image
  encoded once for policy and reference, prefix sharing), for the sigmoid (DPO) and IPO losses:
  within 1e-5 relative, every parameter's gradient too.
* **IPO's normalisation.** TRL divides each log-ratio by its completion's token count before
  IPO's square (``dpo.ipo_average=true``, our default); with ``ipo_average=false`` (summed
  log-ratios, the paper's equation as written) the losses differ, so the check can fail.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from PIL import Image

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import LlavaProcessor  # noqa: E402
from trl import DPOConfig as TRLDPOConfig  # noqa: E402
from trl import DPOTrainer  # noqa: E402

from vlmalign.data.preference import PreferenceCollator  # noqa: E402
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld  # noqa: E402
from vlmalign.methods.dpo import DPOMethod, DPOConfig, load_pairs# noqa: E402
from vlmalign.methods.logps import Reference# noqa: E402
from vlmalign.models import adapter_for, build_tiny  # noqa: E402

TOL = 1e-5
BETA = 0.1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Four ShapesWorld pairs (two images, each with a short-answer and a caption pair) and the
    tiny LLaVA processor saved to a directory."""
    root = tmp_path_factory.mktemp("dpo_parity")
    generate_shapesworld(root, ShapesConfig(seed=1, train_images=2, eval_images=1))
    recs = json.loads((root / "dpo_train.json").read_text())[:4]
    assert len({r["image"] for r in recs}) == 2
    (root / "pairs.json").write_text(json.dumps(recs))
    _, processor = build_tiny("llava")
    processor.save_pretrained(str(root / "processor"))
    return root


@pytest.fixture(scope="module")
def weights():
    """(policy, reference) state dicts: the reference is the tiny LLaVA at seed 0; the policy is
    the same with its language model and head moved."""
    ref, _ = build_tiny("llava", seed=0)
    pol = copy.deepcopy(ref)
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in pol.named_parameters():
            if "vision_tower" not in n and "multi_modal_projector" not in n:
                p.add_(torch.randn_like(p) * 0.05)
    return pol.state_dict(), ref.state_dict()


def _model(state):
    m, _ = build_tiny("llava", seed=0)
    m.load_state_dict(state)
    return m.float().train()


def _trl_examples(root) -> list[dict]:
    out = []
    for r in json.loads((root / "pairs.json").read_text()):
        out.append({"images": [Image.open(root / r["image"]).convert("RGB")],
                    "prompt": [{"role": "user", "content": r["prompt"]}],
                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    return out


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _trl_side(world, weights, loss_type, tmp_path):
    processor = LlavaProcessor.from_pretrained(str(world / "processor"))
    args = TRLDPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, fp16=False,
                        activation_checkpointing=False, max_length=None, beta=BETA, loss_type=[loss_type],
                        disable_dropout=True, per_device_train_batch_size=4)
    examples = _trl_examples(world)
    trainer = DPOTrainer(model=_model(weights[0]), ref_model=_model(weights[1]), args=args,
                         processing_class=processor, train_dataset=Dataset.from_list(copy.deepcopy(examples)))
    inputs = trainer.data_collator(copy.deepcopy(examples))
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), _grads(trainer.model), inputs, metrics


def _our_side(world, weights, loss, **dpo):
    processor = LlavaProcessor.from_pretrained(str(world / "processor"))
    adapter = adapter_for(_model(weights[0]), processor)
    ref = adapter_for(_model(weights[1]).eval(), processor)
    cfg = DPOConfig()
    cfg.data.max_length = 1024
    cfg.dpo.loss, cfg.dpo.beta = loss, BETA
    for k, v in dpo.items():
        setattr(cfg.dpo, k, v)
    examples, loader = load_pairs(str(world / "pairs.json"), cfg, adapter)
    batch = PreferenceCollator(loader, adapter.tokenizer.pad_token_id)(examples)
    # vision tower and projector are equal in policy and reference: one encoding serves both
    method = DPOMethod(adapter, cfg.dpo, ref=Reference(ref, share_features=True))
    adapter.model.zero_grad(set_to_none=True)
    value, sums = method.compute_loss(batch, batch.size)
    value.backward()
    assert adapter.encode_calls == 1 and adapter.encoded_images == 2 and ref.encode_calls == 0
    return float(value.detach()), _grads(adapter.model), batch, sums


def _assert_grads_close(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys() and ours
    scale = max(float(g.abs().max()) for g in theirs.values())
    for n in ours:
        assert float((ours[n] - theirs[n]).abs().max()) <= TOL * scale, n
    diff = math.sqrt(sum(float(((ours[n] - theirs[n]) ** 2).sum()) for n in ours))
    norm = math.sqrt(sum(float((theirs[n] ** 2).sum()) for n in ours))
    assert diff <= TOL * norm


def test_batches_hold_the_same_prompt_and_completion_tokens(world, weights, tmp_path):
    _, _, inputs, _ = _trl_side(world, weights, "sigmoid", tmp_path)
    _, _, batch, _ = _our_side(world, weights, "sigmoid")
    t = batch.tensors
    B = batch.size
    eos = LlavaProcessor.from_pretrained(str(world / "processor")).tokenizer.eos_token_id
    for r in range(2 * B):
        keep = inputs["attention_mask"][r].bool()
        ids = inputs["input_ids"][r][keep]
        comp = inputs["completion_mask"][r][keep].bool()
        p = int(t["row_prompt"][r])
        our_prompt = t["prompt_ids"][p, :int(t["prompt_lens"][p])]
        our_comp = t["completion_ids"][r][t["completion_mask"][r]]
        assert torch.equal(ids[~comp], our_prompt), r
        assert torch.equal(ids[comp], our_comp), r
        assert int(our_comp[-1]) == eos, r
    # chosen and rejected of a pair share one prompt row (and its image) on our side
    assert t["prompt_ids"].shape[0] == B and len(batch.images) == 2


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_gradients_equal_trls(world, weights, tmp_path, loss_type):
    theirs, g_theirs, _, metrics = _trl_side(world, weights, loss_type, tmp_path)
    ours, g_ours, batch, sums = _our_side(world, weights, loss_type)
    assert abs(theirs - math.log(2)) > 1e-3            # policy != reference: a real loss
    assert abs(ours - theirs) <= TOL * abs(theirs), (ours, theirs)
    _assert_grads_close(g_ours, g_theirs)
    if loss_type == "sigmoid":   # TRL logs rewards from summed log-ratios, as we do for DPO
        B = batch.size
        assert abs(float(sums["chosen_reward"]) / B - metrics["rewards/chosen"]) <= 1e-5
        assert abs(float(sums["rejected_reward"]) / B - metrics["rewards/rejected"]) <= 1e-5
        assert abs(float(sums["margin"]) / B - metrics["rewards/margins"]) <= 1e-5
        assert abs(float(sums["accuracy"]) / B - metrics["rewards/accuracies"]) <= 1e-6


def test_ipo_with_summed_log_ratios_is_not_trls(world, weights, tmp_path):
    theirs, _, _, _ = _trl_side(world, weights, "ipo", tmp_path)
    ours, _, _, _ = _our_side(world, weights, "ipo", ipo_average=False)
    # summing instead of averaging changes the loss by far more than the parity tolerance
    # (0.9% here: the completions are mostly 1-3 tokens)
    assert abs(ours - theirs) > 100 * TOL * abs(theirs)
