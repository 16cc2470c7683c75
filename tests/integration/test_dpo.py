"""The DPO trainer on tiny models and ShapesWorld hallucination pairs: training with a LoRA or a
separate reference, the CLI, one image encoding per pair shared by policy and reference, the
reference log-prob cache (reuse and invalidation), prefix sharing (loss and gradients equal the
unshared computation; automatic fallback where it is not exact) and every optimisation together
against the plain computation."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmalign.config import load_config
from vlmalign.data.preference import PreferenceCollator
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.methods import reference as reference_module
from vlmalign.methods import logps as logps_module
from vlmalign.methods import ref_cache
from vlmalign.methods.dpo import DPOConfig, DPOMethod, corruption_of, load_pairs, train_dpo
from vlmalign.methods.logps import Reference, completion_logps, shared_logps, unshared_logps
from vlmalign.models import adapter_for, build_tiny, load_adapter, save_tiny

from test_method_contract import _help
from tiny_kinds import build_kind
from ports import free_port

TOL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    generate_shapesworld(root / "data", ShapesConfig(seed=1, train_images=8, eval_images=4))
    save_tiny("llava", str(root / "model"))
    save_tiny("llava", str(root / "model_seed1"), seed=1)
    return root


def _cfg(world, out, *extra):
    return load_config(DPOConfig, None, [
        f"model.path={world / 'model'}", f"data.train_file={world / 'data' / 'dpo_train.json'}",
        "data.max_length=256", f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=4",
        "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant",
        f"dpo.ref_cache_dir={world / 'ref_cache'}", *extra], base=DPOConfig())


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _method_and_batch(family="llava", n=4, loss="sigmoid", data=None, seed=0, **dpo):
    """A policy adapter (fp32, train mode), a frozen copy as reference and one collated batch.
    ``family``: any kind tiny_kinds.build_kind builds (composed projectors, ``generic``)."""
    model, proc = build_kind(family, seed=seed)
    model.float().train()
    ad = adapter_for(model, proc)
    ref_model, _ = build_kind(family, seed=seed)
    ref = adapter_for(ref_model.float().eval(), proc)
    cfg = DPOConfig()
    cfg.data.train_file = str(data)
    cfg.data.max_length = 512
    cfg.dpo.loss = loss
    for k, v in dpo.items():
        setattr(cfg.dpo, k, v)
    corr = corruption_of(cfg.dpo, 0)
    ex, loader = load_pairs(str(data), cfg, ad, corr, limit=n)
    batch = PreferenceCollator(loader, ad.tokenizer.pad_token_id, corr)(ex)
    return ad, ref, cfg, batch, ex, loader


def _loss_and_grads(method, batch):
    method.adapter.model.zero_grad(set_to_none=True)
    loss, sums = method.compute_loss(batch, batch.size)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in method.adapter.model.named_parameters() if p.grad is not None}
    return loss.detach(), sums, grads


def _assert_grads_close(a: dict, b: dict, rel=TOL):
    """Every gradient within ``rel`` of the largest gradient entry, and the whole gradient vector
    within ``rel`` in norm. (Per-entry relative error is meaningless for gradients that are zero
    in exact arithmetic, e.g. attention key biases, which hold float noise of ~1e-9.)"""
    assert a.keys() == b.keys() and a
    scale = max(float(g.abs().max()) for g in a.values())
    assert scale > 0
    for n in a:
        assert float((a[n] - b[n]).abs().max()) <= rel * scale, n
    diff = math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in a))
    norm = math.sqrt(sum(float((a[n] ** 2).sum()) for n in a))
    assert diff <= rel * norm


def _perturb_language(ad, scale=0.02):
    """Move the policy's language model and head away from the reference (tower and projector
    stay equal, so the reference may share the policy's image features)."""
    torch.manual_seed(123)
    with torch.no_grad():
        for g in ("language", "head"):
            for _, p in ad.param_groups()[g]:
                p.add_(torch.randn_like(p) * scale)


# ----------------------------------------------------------------------------- training
def test_dpo_trains_with_separate_reference(world, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(world, run, "train.max_steps=6", f"data.eval_file={world / 'data' / 'dpo_eval.json'}")
    before = load_adapter(str(world / "model")).model.state_dict()
    result, adapter = train_dpo(cfg)
    assert result.step == 6
    after = adapter.model.state_dict()
    for g, params in adapter.param_groups().items():
        for name, _ in params:
            moved = not torch.equal(after[name], before[name])
            assert moved == (g in ("language", "head")), (g, name)   # tower + projector frozen by default
    rows = _rows(run)
    first = rows[0]
    # step 1: the policy IS the reference, so every implicit reward is 0 and the loss is log 2
    assert abs(first["train/loss"] - math.log(2)) < 1e-6
    assert first["train/margin"] == 0 and first["train/chosen_reward"] == 0
    for k in ("train/accuracy", "train/rejected_reward", "train/logps_chosen", "train/logps_rejected"):
        assert k in first
    assert rows[-2]["train/loss"] < math.log(2) - 0.01      # it learns to prefer chosen
    final = [r for r in rows if "eval/loss" in r][-1]
    for k in ("eval/loss", "eval/accuracy", "eval/chosen_reward", "eval/rejected_reward", "eval/margin"):
        assert k in final
    reloaded = load_adapter(str(run / "checkpoints" / "step-6" / "model"))
    for k, v in reloaded.model.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_dpo_trains_lora_with_adapters_disabled_as_reference(world, tmp_path):
    run = tmp_path / "lora"
    result, adapter = train_dpo(_cfg(world, run, "lora.enabled=true", "lora.r=4"))
    rows = _rows(run)
    assert abs(rows[0]["train/loss"] - math.log(2)) < 1e-6   # zero-init B: policy == reference
    assert rows[-1]["train/margin"] != 0
    base = load_adapter(str(world / "model")).model.state_dict()
    lora_moved = False
    for n, p in adapter.model.named_parameters():
        if "lora_" in n:
            lora_moved |= bool(p.detach().abs().sum() > 0) and "lora_B" in n
        else:
            key = n.replace("base_layer.", "")
            assert torch.equal(p.detach(), base[key]), n             # base weights never change
    assert lora_moved
    assert (run / "checkpoints" / "step-3" / "model" / "adapter_config.json").exists()


def test_cli_train_dpo(world, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    help_out = _help("dpo")   # `vlmalign train dpo --help`, read in this process
    for key in ("dpo.loss", "dpo.precompute_ref_logps", "dpo.prefix_sharing", "ref.path"):
        assert key in help_out
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "vlmalign", "train", "dpo", f"model.path={world / 'model'}",
                           f"data.train_file={world / 'data' / 'dpo_train.json'}", "data.max_length=256",
                           "train.max_steps=1", "train.batch_size=2", "train.progress=false",
                           f"train.output_dir={out}", "dpo.loss=ipo"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: 1 steps" in proc.stdout and "prefix sharing: on" in proc.stderr
    assert (out / "checkpoints" / "step-1" / "model").is_dir()


# ----------------------------------------------------------------------------- encode once
def test_each_image_is_encoded_once_per_step_for_policy_and_reference(world, tmp_path, monkeypatch):
    seen = []
    real = DPOMethod.compute_loss

    def spy(self, batch, num_items):
        # the loader hands out one ImageInputs object per image file: no image appears twice
        assert len({id(x) for x in batch.images}) == len(batch.images)
        seen.append(len(batch.images))
        return real(self, batch, num_items)

    monkeypatch.setattr(DPOMethod, "compute_loss", spy)
    built = {}
    real_frozen = reference_module._frozen

    def frozen(ref_ad, cfg, adapter, **kw):
        built["ref"] = ref_ad
        return real_frozen(ref_ad, cfg, adapter, **kw)

    monkeypatch.setattr(reference_module, "_frozen", frozen)
    _, adapter = train_dpo(_cfg(world, tmp_path / "enc", "train.max_steps=4"))
    assert len(seen) == 4
    # one encoder call per micro-batch, over the batch's unique images only (2 pairs per image
    # in ShapesWorld, so a batch of 4 pairs holds 2 to 4 images); TRL encodes 4 per pair
    assert adapter.encode_calls == 4
    assert adapter.encoded_images == sum(seen) < 4 * 4
    assert built["ref"].encode_calls == 0        # the reference never ran its vision tower


@pytest.mark.parametrize("kind", ["model", "lora"])
def test_reference_encodes_itself_when_the_projector_is_trained(world, tmp_path, monkeypatch, kind):
    """With a trained projector the policy's features are not the reference's: the reference
    encodes the images with its own (frozen) projector. The values used in training are checked
    against a fresh copy of the starting model run through its own pixel path; reusing the
    policy's features instead would give other numbers (so the check can fail)."""
    extra = ["model.train_projector=true"] + (["lora.enabled=true", "lora.r=4"] if kind == "lora" else [])
    captured = {}
    real = DPOMethod.reference_quantities

    def spy(self, batch, policy_encoded=None):
        out = real(self, batch, policy_encoded)
        captured.update(batch=batch, out=out, ref=self.ref)
        return out

    monkeypatch.setattr(DPOMethod, "reference_quantities", spy)
    _, adapter = train_dpo(_cfg(world, tmp_path / kind, "train.max_steps=2", *extra))
    assert captured["ref"].kind == kind and not captured["ref"].share_features
    batch, used = captured["batch"], captured["out"]
    fresh = load_adapter(str(world / "model"))
    fresh.model.eval()
    want = _pixel_path_sums(fresh, batch)
    for name in ("chosen", "rejected"):
        assert torch.allclose(used[name], want[name], rtol=TOL, atol=1e-5), name
    # wrongly sharing the (trained) policy features would not match
    ref = captured["ref"]
    wrong = Reference(ref.adapter, context=ref.context, share_features=True, kind=kind)
    with torch.no_grad():
        lp = wrong.token_logps(batch, batch.encode(adapter), share_prefix=False)
    sums = lp.sum(1)
    assert not torch.allclose(batch.group(sums, "chosen"), want["chosen"], atol=1e-3)


@torch.no_grad()
def _pixel_path_sums(adapter, batch) -> dict:
    """Completion log-prob sums of every row from the model's own pixel_values path."""
    t = batch.tensors
    rows_imgs = batch.row_image_indices()
    out = []
    for r in range(t["input_ids"].shape[0]):
        n = int(t["attention_mask"][r].sum())
        ids = t["input_ids"][r:r + 1, :n]
        pix = adapter.collate_images([batch.images[i] for i in rows_imgs[r]])
        logits = adapter.forward(ids, pixel_inputs=pix).logits[0].float()
        p = int(t["row_prompt_lens"][r])
        lp = logits[p - 1:n - 1].log_softmax(-1).gather(-1, ids[0, p:n, None]).squeeze(-1)
        out.append(lp.sum())
    sums = torch.stack(out)
    return {name: batch.group(sums, name) for name in batch.row_names}


# ----------------------------------------------------------------------------- reference cache
def _count_ref_forwards(monkeypatch):
    calls = {"n": 0}
    real = Reference.token_logps

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(Reference, "token_logps", counting)
    return calls


def test_precomputed_reference_is_cached_reused_and_invalidated(world, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = _count_ref_forwards(monkeypatch)
    base = [f"dpo.ref_cache_dir={cache}", "dpo.precompute_ref_logps=true", "train.max_steps=2",
            "data.max_train_samples=8"]
    evals = [f"data.eval_file={world / 'data' / 'dpo_eval.json'}", "train.eval_every=1"]

    def run(name, *extra):
        """(passes computed, caches loaded, reference forwards) of one training run."""
        before = dict(ref_cache.COUNTERS)
        n0 = calls["n"]
        train_dpo(_cfg(world, tmp_path / name, *base, *extra))
        return (ref_cache.COUNTERS["computed"] - before["computed"],
                ref_cache.COUNTERS["loaded"] - before["loaded"], calls["n"] - n0)

    # first run: one pass over train (8 pairs / 4) and eval (8 / 4); no reference forward in
    # the 2 steps or the 2 evaluations
    assert run("a", *evals) == (2, 0, 2 + 2)
    keys = {p.name for p in cache.iterdir()}
    assert len(keys) == 2
    for k in keys:
        meta = json.loads((cache / k / "meta.json").read_text())
        assert meta["quantities"] == ["chosen", "rejected"] and meta["num_examples"] == 8
        assert (cache / k / "ref_logps.safetensors").exists()
    # a second run with the same settings (another output dir) reads them: no reference forward
    assert run("b", *evals) == (0, 2, 0)
    assert run("b2") == (0, 1, 0)
    # each key part invalidates: tokenization, data bytes, reference weights, loss settings
    assert run("c", "data.max_length=300") == (1, 0, 2)
    changed = tmp_path / "dpo_train.json"
    recs = json.loads((world / "data" / "dpo_train.json").read_text())
    recs[0]["chosen"] = recs[0]["chosen"] + " indeed"
    changed.write_text(json.dumps(recs))
    assert run("d", f"data.train_file={changed}", f"data.image_root={world / 'data'}") == (1, 0, 2)
    assert run("e", f"ref.path={world / 'model_seed1'}") == (1, 0, 2)
    assert run("f", "dpo.loss=token_weighted") == (1, 0, 2)
    assert run("g", "dpo.loss=token_weighted", "dpo.token_weight_gamma=3") == (1, 0, 2)
    assert run("h", "dpo.loss=token_weighted", "dpo.token_weight_gamma=3") == (0, 1, 0)
    # keys: a (train, eval), c, d, e, f, g; b, b2 and h reused earlier ones
    assert len({p.name for p in cache.iterdir() if not p.name.startswith(".")}) == 2 + 5


def test_precomputed_values_equal_the_live_reference(world):
    ad, ref, cfg, batch, ex, loader = _method_and_batch(data=world / "data" / "dpo_train.json", n=6)
    live = DPOMethod(ad, cfg.dpo, ref=Reference(ref, share_features=False))
    values = ref_cache.compute_values(live, ex, PreferenceCollator(loader, ad.tokenizer.pad_token_id), 4, "cpu")
    cached = DPOMethod(ad, cfg.dpo, ref_values=values)
    got, want = cached.reference_quantities(batch), live.reference_quantities(batch)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=TOL, atol=1e-6), k


# ----------------------------------------------------------------------------- prefix sharing
@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics3", "instructblip", "internvl", "smolvlm",
                                    "vlmalign_aligngpt", "vlmalign_resampler", "vlmalign_resampler:qformer",
                                    "vlmalign_resampler:linear", "vlmalign_resampler:mlp2x_gelu", "generic"])
def test_prefix_sharing_equals_unshared_loss_and_gradients(world, family):
    ad, ref, cfg, batch, _, _ = _method_and_batch(family, data=world / "data" / "dpo_train.json", n=4)
    ad.model.eval()   # InstructBLIP's Q-Former has dropout: compare without it
    assert batch.tensors["prompt_ids"].shape[0] < batch.num_rows        # prompts are shared
    # the reference is the policy itself, so the loss is exactly log 2; use a moved policy
    _perturb_language(ad)
    results = {}
    for share in (False, True):
        cfg.dpo.prefix_sharing = share
        m = DPOMethod(ad, cfg.dpo, ref=Reference(ref, share_features=False))
        results[share] = _loss_and_grads(m, batch)
    (l0, s0, g0), (l1, s1, g1) = results[False], results[True]
    assert abs(float(l0) - math.log(2)) > 1e-3
    assert not logps_module._warned, logps_module._warned       # the shared path ran, no fallback
    assert abs(float(l1 - l0)) <= TOL * abs(float(l0))
    for k in ("chosen_reward", "rejected_reward", "logps_chosen"):
        assert abs(float(s1[k] - s0[k])) <= TOL * max(1.0, abs(float(s0[k]))), k
    _assert_grads_close(g0, g1)


def test_shared_and_unshared_token_logps_agree_and_differ_from_a_wrong_cache(world):
    """The check above can fail: continuing the wrong prompt's cache changes the numbers."""
    ad, _, _, batch, _, _ = _method_and_batch(data=world / "data" / "dpo_train.json", n=4)
    ad.model.eval()
    with torch.no_grad():
        enc = batch.encode(ad)
        a = unshared_logps(ad, batch, enc)
        b = shared_logps(ad, batch, enc)
        assert torch.allclose(a, b, rtol=TOL, atol=1e-5)
        batch.tensors["row_prompt"] = batch.tensors["row_prompt"].flip(0)
        c = shared_logps(ad, batch, enc)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "paligemma", "gemma3", "qwen3_vl", "mllama"])
def test_prefix_sharing_falls_back_where_not_exact(world, family, caplog):
    ad, ref, cfg, batch, _, _ = _method_and_batch(family, data=world / "data" / "dpo_train.json", n=4)
    ad.model.eval()
    with caplog.at_level(logging.WARNING, logger="vlmalign.methods.logps"), torch.no_grad():
        enc = batch.encode(ad)
        shared = completion_logps(ad, batch, enc, share_prefix=True)
        plain = unshared_logps(ad, batch, enc)
    assert torch.equal(shared, plain)
    assert f"prefix sharing off: {family}: prefix sharing is not exact" in caplog.text


# ----------------------------------------------------------------------------- all together
def test_every_optimisation_together_equals_plain_dpo(world, tmp_path):
    """Encode-once + prefix sharing + precomputed reference vs. the plain computation (full
    sequences, the reference encoding images itself, live reference): loss and gradients on one
    batch, then two training steps end to end."""
    ad, ref, cfg, batch, ex, loader = _method_and_batch(data=world / "data" / "dpo_train.json", n=6)
    _perturb_language(ad)
    plain_cfg = cfg.dpo
    plain_cfg.prefix_sharing = False
    plain = DPOMethod(ad, plain_cfg, ref=Reference(ref, share_features=False))
    fast_cfg = DPOConfig().dpo
    fast = DPOMethod(ad, fast_cfg, ref=Reference(ref, share_features=True))
    collate = PreferenceCollator(loader, ad.tokenizer.pad_token_id)
    fast.ref_values = ref_cache.compute_values(fast, ex, collate, 3, "cpu")
    fast.ref = None
    calls0 = ref.encode_calls
    l0, s0, g0 = _loss_and_grads(plain, batch)
    assert ref.encode_calls == calls0 + 1                  # the plain path encodes for the reference
    enc0 = ad.encode_calls
    l1, s1, g1 = _loss_and_grads(fast, batch)
    assert ad.encode_calls == enc0 + 1 and ref.encode_calls == calls0 + 1
    assert abs(float(l1 - l0)) <= TOL * abs(float(l0))
    for k in ("chosen_reward", "rejected_reward", "margin", "accuracy"):
        assert abs(float(s1[k] - s0[k])) <= TOL * max(1.0, abs(float(s0[k]))), k
    _assert_grads_close(g0, g1)

    runs = {}
    for name, extra in (("plain", ["dpo.prefix_sharing=false"]),
                        ("fast", ["dpo.prefix_sharing=true", "dpo.precompute_ref_logps=true",
                                  f"dpo.ref_cache_dir={tmp_path / 'c'}"])):
        train_dpo(_cfg(world, tmp_path / name, "train.max_steps=2", "train.precision=fp32",
                       "data.max_train_samples=8", *extra))
        runs[name] = _rows(tmp_path / name)
    for a, b in zip(runs["plain"], runs["fast"]):
        assert abs(a["train/loss"] - b["train/loss"]) <= TOL * abs(a["train/loss"])


# ----------------------------------------------------------------------------- every loss
LOSS_SETTINGS = {"sigmoid": {}, "cdpo": {"label_smoothing": 0.1}, "ipo": {}, "hinge": {},
                 "simpo": {"beta": 2.0, "simpo_gamma": 0.3}, "orpo": {"orpo_lambda": 0.2},
                 "token_weighted": {"token_weight_gamma": 4.0}, "mdpo": {"mdpo_anchor": 0.05}}


@torch.no_grad()
def _pixel_token_logps(adapter, batch) -> list[torch.Tensor]:
    """Per row: the completion's token log-probs from the model's own pixel_values path, one
    unpadded sequence at a time (independent of our batching, sharing and encoding)."""
    t = batch.tensors
    imgs = batch.row_image_indices()
    out = []
    for r in range(t["input_ids"].shape[0]):
        n = int(t["attention_mask"][r].sum())
        ids = t["input_ids"][r:r + 1, :n]
        pix = adapter.collate_images([batch.images[i] for i in imgs[r]])
        logits = adapter.forward(ids, pixel_inputs=pix).logits[0].float()
        p = int(t["row_prompt_lens"][r])
        out.append(logits[p - 1:n - 1].log_softmax(-1).gather(-1, ids[0, p:n, None]).squeeze(-1))
    return out


def _expected_losses(d, batch, pol, ref):
    """The loss functions of losses/preference.py applied to per-row log-probs, by hand, plus
    ``rpo_alpha`` times the chosen rows' per-token NLL."""
    losses = _expected_preference_losses(d, batch, pol, ref)
    if d.rpo_alpha:
        chosen = pol[batch.row_names.index("chosen") * batch.size:][:batch.size]
        losses = losses + d.rpo_alpha * torch.stack([-x.mean() for x in chosen])
    return losses


def _expected_preference_losses(d, batch, pol, ref):
    from vlmalign.losses.preference import (changed_token_weights, dpo_loss, mdpo_loss, orpo_loss,
                                            simpo_loss)
    B = batch.size

    def rows(lst, name):
        i = batch.row_names.index(name)
        return lst[i * B:(i + 1) * B]

    def total(lst, name):
        return torch.stack([x.sum() for x in rows(lst, name)])

    def mean(lst, name):
        return torch.stack([x.mean() for x in rows(lst, name)])

    pc, pr, rc, rr = total(pol, "chosen"), total(pol, "rejected"), total(ref, "chosen"), total(ref, "rejected")
    if d.loss in ("sigmoid", "cdpo", "hinge"):
        return dpo_loss(pc, pr, rc, rr, beta=d.beta, loss_type="hinge" if d.loss == "hinge" else "sigmoid",
                        label_smoothing=d.label_smoothing)[0]
    if d.loss == "ipo":
        return dpo_loss(mean(pol, "chosen"), mean(pol, "rejected"), mean(ref, "chosen"), mean(ref, "rejected"),
                        beta=d.beta, loss_type="ipo")[0]
    if d.loss == "simpo":
        return simpo_loss(mean(pol, "chosen"), mean(pol, "rejected"), beta=d.beta, gamma=d.simpo_gamma)[0]
    if d.loss == "orpo":
        c = mean(pol, "chosen")
        return orpo_loss(c, mean(pol, "rejected"), -c, lam=d.orpo_lambda)[0]
    if d.loss == "token_weighted":
        ids = batch.tensors["completion_ids"]
        mask = batch.tensors["completion_mask"]
        vals = {k: [] for k in ("pc", "pr", "rc", "rr")}
        for b in range(B):
            c_ids, r_ids = ids[b][mask[b]], ids[B + b][mask[B + b]]
            wc, wr = changed_token_weights(c_ids[None], r_ids[None], torch.ones_like(c_ids[None], dtype=torch.bool),
                                           torch.ones_like(r_ids[None], dtype=torch.bool), gamma=d.token_weight_gamma)
            for key, lp, w in (("pc", pol[b], wc[0]), ("pr", pol[B + b], wr[0]), ("rc", ref[b], wc[0]),
                               ("rr", ref[B + b], wr[0])):
                vals[key].append((w * lp).sum() / w.sum())
        v = {k: torch.stack(x) for k, x in vals.items()}
        return dpo_loss(v["pc"], v["pr"], v["rc"], v["rr"], beta=d.beta)[0]
    assert d.loss == "mdpo"
    return mdpo_loss(pc, pr, rc, rr, total(pol, "chosen_corrupt"), total(ref, "chosen_corrupt"), beta=d.beta,
                     anchor=d.mdpo_anchor)[0]


@pytest.mark.parametrize("loss", list(LOSS_SETTINGS))
def test_each_loss_is_wired_to_its_function(world, loss):
    ad, ref, cfg, batch, _, _ = _method_and_batch(loss=loss, data=world / "data" / "dpo_train.json", n=2,
                                                  **LOSS_SETTINGS[loss])
    _perturb_language(ad)
    ad.model.eval()
    method = DPOMethod(ad, cfg.dpo, ref=Reference(ref, share_features=True))
    value, sums = method.compute_loss(batch, batch.size)
    want = _expected_losses(cfg.dpo, batch, _pixel_token_logps(ad, batch), _pixel_token_logps(ref, batch))
    assert abs(float(value) - float(want.mean())) <= TOL * abs(float(want.mean())), (float(value), float(want.mean()))
    assert abs(float(sums["loss"]) - float(want.sum())) <= TOL * abs(float(want.sum()))
    value.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in ad.model.parameters())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "token_weighted"])
def test_rpo_adds_the_chosen_nll_to_each_loss(world, loss):
    """dpo.rpo_alpha: the method's loss is its preference loss plus alpha x the chosen rows'
    per-token NLL, from each row's own pixel forward; the nll is logged."""
    settings = {**LOSS_SETTINGS.get(loss, {}), "rpo_alpha": 0.7}
    ad, ref, cfg, batch, _, _ = _method_and_batch(loss=loss, data=world / "data" / "dpo_train.json", n=2, **settings)
    _perturb_language(ad)
    ad.model.eval()
    value, sums = DPOMethod(ad, cfg.dpo, ref=Reference(ref, share_features=True)).compute_loss(batch, batch.size)
    pol = _pixel_token_logps(ad, batch)
    want = _expected_losses(cfg.dpo, batch, pol, _pixel_token_logps(ref, batch))
    without = _expected_preference_losses(cfg.dpo, batch, pol, _pixel_token_logps(ref, batch))
    assert float(want.mean() - without.mean()) > 0.01          # the term is not negligible here
    assert abs(float(value) - float(want.mean())) <= TOL * abs(float(want.mean()))
    assert float(sums["nll"]) == pytest.approx(float((want - without).sum()) / 0.7, rel=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "qwen3_vl", "internvl", "mllama", "qwen2_5_vl", "smolvlm", "paligemma",
                                    "vlmalign_aligngpt", "vlmalign_resampler", "vlmalign_resampler:qformer",
                                    "vlmalign_resampler:linear", "vlmalign_resampler:mlp2x_gelu", "generic"])
def test_dpo_step_equals_the_pixel_path(world, family):
    """One DPO step on a family with bidirectional image blocks / M-RoPE variants (and on the
    families and composed kinds no other encode-once DPO test covers): images encoded once for
    chosen, rejected and the reference; the loss equals the one from each row's own pixel
    forward; the step has gradients."""
    ad, ref, cfg, batch, _, _ = _method_and_batch(family, data=world / "data" / "dpo_train.json", n=2)
    _perturb_language(ad)
    ad.model.eval()
    method = DPOMethod(ad, cfg.dpo, ref=Reference(ref, share_features=True))
    calls, ref_calls = ad.encode_calls, ref.encode_calls
    value, _ = method.compute_loss(batch, batch.size)
    assert ad.encode_calls == calls + 1 and ref.encode_calls == ref_calls
    want = float(_expected_losses(cfg.dpo, batch, _pixel_token_logps(ad, batch), _pixel_token_logps(ref, batch)).mean())
    got = float(value.detach())
    assert abs(got - want) <= TOL * abs(want), (got, want)
    assert abs(got - math.log(2)) > 1e-4
    value.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for _, p in ad.param_groups()["language"])


def test_mdpo_corrupted_images_are_other_pixels_and_reproducible(world):
    ad, _, cfg, batch, ex, loader = _method_and_batch(loss="mdpo", data=world / "data" / "dpo_train.json", n=4)
    assert batch.row_names == ("chosen", "rejected", "chosen_corrupt")
    B = batch.size
    imgs = batch.row_image_indices()
    for b in range(B):
        real, corrupt = imgs[b][0], imgs[2 * B + b][0]
        assert imgs[B + b] == imgs[b]                      # the rejected row keeps the real image
        a = batch.images[real].tensors["pixel_values"]
        c = batch.images[corrupt].tensors["pixel_values"]
        assert a.shape == c.shape and not torch.allclose(a, c, atol=1e-2)
    again = PreferenceCollator(loader, ad.tokenizer.pad_token_id, corruption_of(cfg.dpo, 0))(ex)
    for x, y in zip(batch.images, again.images):
        assert torch.equal(x.tensors["pixel_values"], y.tensors["pixel_values"])
    # another seed crops elsewhere: some corrupted image changes (any single one may not: a crop of
    # at most 20% can fall on plain background under both seeds; the seed also mixes in the
    # file's path, so which one depends on where the test runs)
    other = PreferenceCollator(loader, ad.tokenizer.pad_token_id, corruption_of(cfg.dpo, 1))(ex)
    corrupt = sorted({imgs[2 * B + b][0] for b in range(B)})
    assert any(not torch.equal(batch.images[i].tensors["pixel_values"], other.images[i].tensors["pixel_values"])
               for i in corrupt)


def test_rejected_images_are_shown_with_the_rejected_response(world, tmp_path):
    """A pair whose rejected response comes with another image gets its own prompt row; sharing
    and the loss stay exact."""
    recs = json.loads((world / "data" / "dpo_train.json").read_text())[:4:2]   # two images
    lines = []
    for i, r in enumerate(recs):
        other = recs[1 - i]["image"]
        lines.append({"kind": "preference", "prompt": [{"role": "user", "content": [
            {"type": "image", "image": r["image"]}, {"type": "text", "text": r["prompt"]}]}],
            "chosen": r["chosen"], "rejected": r["rejected"], "rejected_images": [other]})
    f = world / "data" / "with_rejected_images.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ad, ref, cfg, batch, _, _ = _method_and_batch(data=f, n=2)
    assert batch.tensors["prompt_ids"].shape[0] == 4        # 2 pairs x (real, rejected's image)
    imgs = batch.row_image_indices()
    assert imgs[0] == imgs[3] and imgs[1] == imgs[2] and imgs[0] != imgs[1]
    _perturb_language(ad)
    ad.model.eval()
    method = DPOMethod(ad, cfg.dpo, ref=Reference(ref, share_features=True))
    value, _ = method.compute_loss(batch, batch.size)
    want = _expected_losses(cfg.dpo, batch, _pixel_token_logps(ad, batch), _pixel_token_logps(ref, batch))
    assert abs(float(value) - float(want.mean())) <= TOL * abs(float(want.mean()))


@pytest.mark.parametrize("loss", ["cdpo", "hinge", "simpo", "orpo", "mdpo"])
def test_train_each_loss(world, tmp_path, loss, monkeypatch):
    built = []
    monkeypatch.setattr(reference_module, "_frozen",
                        lambda *a, _f=reference_module._frozen, **k: built.append(1) or _f(*a, **k))
    extra = [f"dpo.{k}={v}" for k, v in LOSS_SETTINGS[loss].items()]
    if loss == "mdpo":
        extra += ["dpo.precompute_ref_logps=true", f"dpo.ref_cache_dir={tmp_path / 'c'}"]
    result, _ = train_dpo(_cfg(world, tmp_path / loss, f"dpo.loss={loss}", "train.max_steps=2",
                               "data.max_train_samples=8", *extra))
    assert result.step == 2 and math.isfinite(result.metrics["loss"])
    assert bool(built) == (loss not in ("simpo", "orpo"))     # reference-free losses build no reference
    keys = set(_rows(tmp_path / loss)[-1])
    assert {"train/loss", "train/accuracy", "train/margin"} <= keys
    if loss == "mdpo":
        assert {"train/cond_loss", "train/anchor_loss", "train/cond_accuracy"} <= keys
        meta = json.loads(next((tmp_path / "c").glob("*/meta.json")).read_text())
        assert meta["quantities"] == ["chosen", "chosen_corrupt", "rejected"]
    if loss == "orpo":
        assert {"train/or_loss", "train/nll"} <= keys


def test_bad_settings_are_refused(world, tmp_path):
    from vlmalign.errors import VlmalignError
    with pytest.raises(VlmalignError, match="cdpo needs dpo.label_smoothing"):
        train_dpo(_cfg(world, tmp_path / "x", "dpo.loss=cdpo"))
    with pytest.raises(VlmalignError, match="label_smoothing applies to"):
        train_dpo(_cfg(world, tmp_path / "y", "dpo.loss=ipo", "dpo.label_smoothing=0.1"))
    with pytest.raises(VlmalignError, match="rpo_alpha does not apply to dpo.loss=orpo"):
        train_dpo(_cfg(world, tmp_path / "w", "dpo.loss=orpo", "dpo.rpo_alpha=1.0"))
    other = save_tiny("idefics3", str(tmp_path / "idefics3"))
    with pytest.raises(VlmalignError, match="the reference must be the policy's family"):
        train_dpo(_cfg(world, tmp_path / "z", f"ref.path={other}"))


@pytest.mark.slow
def test_two_processes_match_one(world, tmp_path):
    """LoRA (reference = adapters disabled), prefix sharing and the precomputed reference across
    two gloo processes: the main process computes the cache, the other waits and reads it; the
    losses equal a one-process run with the same global batch."""
    common = ["train", "dpo", f"model.path={world / 'model'}", f"data.train_file={world / 'data' / 'dpo_train.json'}",
              "data.max_length=256", "train.max_steps=3", "train.progress=false", "optim.lr=1e-3",
              "optim.warmup_steps=0", "lora.enabled=true", "lora.r=4", "dpo.precompute_ref_logps=true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "vlmalign", *common, "train.batch_size=4", f"train.output_dir={one}",
                    f"dpo.ref_cache_dir={tmp_path / 'c1'}"], check=True, env=env, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "vlmalign", *common, "train.batch_size=2", f"train.output_dir={two}",
                        f"dpo.ref_cache_dir={tmp_path / 'c2'}"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("reference log-probs: computed") == 1
    la, lb = ([x["train/loss"] for x in _rows(d)] for d in (one, two))
    assert len(la) == len(lb) == 3 and abs(la[0] - math.log(2)) < 1e-6
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (la, lb)


def test_weight_fingerprint_sees_a_single_small_change():
    model, _ = build_tiny("llava")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    base = ref_cache.module_fingerprint(sd.items())
    assert ref_cache.module_fingerprint(sd.items()) == base
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    orig = sd[name].clone()
    sd[name][3, 5] += 1e-6
    assert ref_cache.module_fingerprint(sd.items()) != base
    sd[name] = orig.clone()
    assert ref_cache.module_fingerprint(sd.items()) == base
    sd[name][[3, 4]] = orig[[4, 3]]              # two rows swapped: same sum, other positions
    assert ref_cache.module_fingerprint(sd.items()) != base
