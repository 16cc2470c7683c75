"""Listwise DPO (`vlmalign train dpo dpo.loss=listwise`) on ranked lists: with K = 2 it is
sigmoid DPO (loss and gradients), lists of unequal length against a per-list computation
through the model's own pixel path, training on ShapesWorld ranked lists with one image
encoding per record per step, the precomputed reference, and bad data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vlmalign.config import load_config
from vlmalign.data.preference import PreferenceCollator
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.errors import DataError, VlmalignError
from vlmalign.methods import reference as reference_module
from vlmalign.methods import ref_cache
from vlmalign.methods.dpo import DPOConfig, DPOMethod, load_pairs, train_dpo
from vlmalign.methods.listwise import ListwiseMethod, load_listwise
from vlmalign.methods.logps import Reference
from vlmalign.models import adapter_for, build_tiny, save_tiny

TOL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("listwise")
    generate_shapesworld(root / "data", ShapesConfig(seed=1, train_images=8, eval_images=4))
    save_tiny("llava", str(root / "model"))
    # lists of unequal length: every other ShapesWorld list (3 candidates) cut to its best two
    recs = json.loads((root / "data" / "ranked_train.json").read_text())
    for i, r in enumerate(recs):
        if i % 2:
            r["conversations"][-1]["value"] = r["conversations"][-1]["value"][:2]
            r["num_errors"] = r["num_errors"][:2]
    (root / "data" / "ranked_mixed.json").write_text(json.dumps(recs))
    return root


def _cfg(world, out, *extra):
    return load_config(DPOConfig, None, [
        f"model.path={world / 'model'}", f"data.train_file={world / 'data' / 'ranked_train.json'}",
        "data.max_length=256", f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=4",
        "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant",
        "dpo.loss=listwise", f"dpo.ref_cache_dir={world / 'ref_cache'}", *extra], base=DPOConfig())


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _policy_and_reference(family):
    model, proc = build_tiny(family, seed=0)
    ad = adapter_for(model.float().eval(), proc)
    ref_model, _ = build_tiny(family, seed=0)
    ref = adapter_for(ref_model.float().eval(), proc)
    torch.manual_seed(3)
    with torch.no_grad():
        for g in ("language", "head"):
            for _, p in ad.param_groups()[g]:
                p.add_(torch.randn_like(p) * 0.02)
    return ad, ref


def _listwise_batch(ad, file, n, **dpo):
    cfg = DPOConfig()
    cfg.data.train_file = str(file)
    cfg.data.max_length = 512
    cfg.data.max_train_samples = n
    cfg.dpo.loss = "listwise"
    for k, v in dpo.items():
        setattr(cfg.dpo, k, v)
    ex, collate, _, _, _ = load_listwise(cfg, ad)
    return cfg, ex, collate, collate(ex)


def _loss_and_grads(method, batch):
    method.adapter.model.zero_grad(set_to_none=True)
    loss, sums = method.compute_loss(batch, batch.size)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in method.adapter.model.named_parameters() if p.grad is not None}
    return loss.detach(), sums, grads


def _assert_grads_close(a: dict, b: dict, rel=TOL):
    """Every gradient within ``rel`` of the largest gradient entry."""
    assert a.keys() == b.keys() and a
    scale = max(float(g.abs().max()) for g in a.values())
    assert scale > 0
    for n in a:
        assert float((a[n] - b[n]).abs().max()) <= rel * scale, n


# ----------------------------------------------------------------------------- K = 2 is DPO
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_two_candidates_equal_sigmoid_dpo_loss_and_gradients(world, family):
    """The same 4 ShapesWorld pairs as pairs (DPOMethod, sigmoid, full sequences) and as ranked
    lists of two (ListwiseMethod, prefix sharing where the family allows it):
    -[(r0 - lse(r0, r1)) + (r1 - r1)] = -log sig(r0 - r1), DPO's loss."""
    ad, ref = _policy_and_reference(family)
    data = world / "data" / "dpo_train.json"
    pcfg = DPOConfig()
    pcfg.data.max_length = 512
    pcfg.dpo.prefix_sharing = False
    pairs, loader = load_pairs(str(data), pcfg, ad, None, limit=4)
    pbatch = PreferenceCollator(loader, ad.tokenizer.pad_token_id)(pairs)
    lcfg, _, _, lbatch = _listwise_batch(ad, data, 4)
    assert lbatch.tensors["cand_row"].shape == (4, 2) and bool(lbatch.candidate_mask.all())
    dpo = DPOMethod(ad, pcfg.dpo, ref=Reference(ref, share_features=True))
    lw = ListwiseMethod(ad, lcfg.dpo, ref=Reference(ref, share_features=True))
    l0, s0, g0 = _loss_and_grads(dpo, pbatch)
    l1, s1, g1 = _loss_and_grads(lw, lbatch)
    assert abs(float(l0) - math.log(2)) > 1e-3            # the policy differs from the reference
    assert abs(float(l1 - l0)) <= TOL * abs(float(l0))
    for a, b in (("loss", "loss"), ("accuracy", "accuracy"), ("margin", "margin"), ("chosen_reward", "chosen_reward"),
                 ("logps_chosen", "logps_best")):
        assert abs(float(s1[b] - s0[a])) <= TOL * max(1.0, abs(float(s0[a]))), a
    _assert_grads_close(g0, g1)


# ----------------------------------------------------------------------------- unequal lengths
def _pixel_sum(adapter, prompt, response, images):
    p, c, _ = adapter.tokenize_completion(prompt, response, images)
    ids = torch.tensor([p + c])
    logits = adapter.forward(ids, pixel_inputs=adapter.collate_images(images)).logits[0].float()
    return logits[len(p) - 1:-1].log_softmax(-1).gather(-1, ids[0, len(p):, None]).squeeze(-1).sum()


def test_lists_of_unequal_length_equal_a_per_list_computation(world):
    """Lists of 3, 2, 3, 2 candidates in one batch: 10 rows (no padded rows), and each list's
    loss equals its own Plackett-Luce loss computed alone through the pixel path:
    L = -sum_k [r_k - log sum_{j >= k} exp(r_j)], r_k = beta (pol_k - ref_k)."""
    beta = 0.5
    ad, ref = _policy_and_reference("llava")
    cfg, ex, collate, batch = _listwise_batch(ad, world / "data" / "ranked_mixed.json", 4, beta=beta)
    assert collate.k == 3 and batch.num_rows == 10
    assert batch.tensors["cand_row"].tolist() == [[0, 1, 2], [3, 4, -1], [5, 6, 7], [8, 9, -1]]
    imgs = batch.row_image_indices()
    assert imgs[0] == imgs[1] == imgs[2] != imgs[3] == imgs[4]          # a list's rows share its image
    assert len(batch.images) == 4 and batch.tensors["prompt_ids"].shape[0] == 4
    method = ListwiseMethod(ad, cfg.dpo, ref=Reference(ref, share_features=True))
    value, sums, got = _loss_and_grads(method, batch)

    ad.model.zero_grad(set_to_none=True)
    losses = []
    for e in ex:
        rec = e.record
        images = [collate.loader.inputs(r) for r in rec.images]
        r = []
        for resp in rec.responses:
            pol = _pixel_sum(ad, rec.prompt, resp, images)
            with torch.no_grad():
                rf = _pixel_sum(ref, rec.prompt, resp, images)
            r.append(beta * (pol - rf))
        losses.append(-sum(r[k] - torch.logsumexp(torch.stack(r[k:]), 0) for k in range(len(r))))
    assert [len(e.record.responses) for e in ex] == [3, 2, 3, 2]
    want = torch.stack(losses).mean()
    want.backward()
    want_grads = {n: p.grad.detach().clone() for n, p in ad.model.named_parameters() if p.grad is not None}
    assert abs(float(value) - float(want.detach())) <= TOL * abs(float(want.detach()))
    assert float(sums["num_candidates"]) == 10
    _assert_grads_close(got, want_grads)


# ----------------------------------------------------------------------------- training
def test_listwise_trains_on_shapesworld_ranked_lists_encoding_each_image_once(world, tmp_path, monkeypatch):
    seen = []
    real = ListwiseMethod.compute_loss

    def spy(self, batch, num_items):
        seen.append((len(batch.images), batch.size, batch.num_rows))
        return real(self, batch, num_items)

    monkeypatch.setattr(ListwiseMethod, "compute_loss", spy)
    built = {}
    real_frozen = reference_module._frozen

    def frozen(ref_ad, cfg, adapter, **kw):
        built["ref"] = ref_ad
        return real_frozen(ref_ad, cfg, adapter, **kw)

    monkeypatch.setattr(reference_module, "_frozen", frozen)
    run = tmp_path / "run"
    result, adapter = train_dpo(_cfg(world, run, "train.max_steps=4",
                                     f"data.eval_file={world / 'data' / 'ranked_eval.json'}"))
    assert result.step == 4
    rows = _rows(run)
    # step 1: policy = reference, every reward 0: L = log 3 + log 2 + log 1 = log 6 per list of 3
    assert abs(rows[0]["train/loss"] - math.log(6)) < 1e-5
    assert rows[0]["train/num_candidates"] == 3 and rows[0]["train/margin"] == 0
    assert rows[-2]["train/loss"] < math.log(6) - 0.01 and rows[-2]["train/accuracy"] > 0.5
    final = rows[-1]
    for k in ("eval/loss", "eval/accuracy", "eval/margin", "eval/top1", "eval/chosen_reward"):
        assert math.isfinite(final[k]), k
    # 4 training steps + 1 evaluation batch (4 lists): one encoder call each over the batch's
    # images (one per list in ShapesWorld), for 3 candidate rows per list, policy and reference
    assert len(seen) == 5 and all(n_img == b and rows_ == 3 * b for n_img, b, rows_ in seen)
    assert adapter.encode_calls == 5 and adapter.encoded_images == sum(n for n, _, _ in seen)
    assert built["ref"].encode_calls == 0


def test_precomputed_listwise_reference_is_cached_and_equals_the_live_one(world, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = {"n": 0}
    real = Reference.token_logps

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(Reference, "token_logps", counting)
    common = ["train.max_steps=2", "train.precision=fp32", f"data.train_file={world / 'data' / 'ranked_mixed.json'}"]
    pre = [f"dpo.ref_cache_dir={cache}", "dpo.precompute_ref_logps=true"]

    def run(name, *extra):
        before = dict(ref_cache.COUNTERS)
        n0 = calls["n"]
        train_dpo(_cfg(world, tmp_path / name, *common, *extra))
        return (ref_cache.COUNTERS["computed"] - before["computed"],
                ref_cache.COUNTERS["loaded"] - before["loaded"], calls["n"] - n0)

    assert run("live") == (0, 0, 2)
    assert run("a", *pre) == (1, 0, 2)        # 8 lists in 2 batches, once; none during training
    assert run("b", *pre) == (0, 1, 0)
    (meta,) = [json.loads(p.read_text()) for p in cache.glob("*/meta.json")]
    assert meta["quantities"] == ["cand_0", "cand_1", "cand_2"] and meta["num_examples"] == 8
    for x, y in zip(_rows(tmp_path / "live"), _rows(tmp_path / "a")):
        assert abs(x["train/loss"] - y["train/loss"]) <= TOL * abs(x["train/loss"])


# ----------------------------------------------------------------------------- bad input
def test_bad_data_and_settings_are_refused(world, tmp_path):
    recs = json.loads((world / "data" / "ranked_train.json").read_text())
    recs[1]["conversations"][-1]["value"] = ["A red circle.", "  "]
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"bad.json: record 1: field 'conversations\[1\].value\[1\]': empty or missing "
                                        r"response"):
        train_dpo(_cfg(world, tmp_path / "a", f"data.train_file={f}", f"data.image_root={world / 'data'}"))
    with pytest.raises(DataError, match=r"kto_train.jsonl: record 0: field 'kind': a unpaired record cannot be "
                                        r"read as 'ranked'"):
        train_dpo(_cfg(world, tmp_path / "b", f"data.train_file={world / 'data' / 'kto_train.jsonl'}"))
    with pytest.raises(DataError, match=r"ranked_train.json: record 0: field 'responses\[0\]': .*over max_length 40"):
        train_dpo(_cfg(world, tmp_path / "c", "data.max_length=40"))
    with pytest.raises(VlmalignError, match="label_smoothing applies to"):
        train_dpo(_cfg(world, tmp_path / "d", "dpo.label_smoothing=0.1"))
    ad, ref = _policy_and_reference("llava")
    cfg = DPOConfig()
    cfg.dpo.loss = "listwise"
    with pytest.raises(VlmalignError, match="computed by methods.listwise.ListwiseMethod"):
        DPOMethod(ad, cfg.dpo, ref=Reference(ref))
    cfg.dpo.loss = "sigmoid"
    with pytest.raises(VlmalignError, match="computed by methods.listwise.ListwiseMethod"):
        ListwiseMethod(ad, cfg.dpo, ref=Reference(ref))
