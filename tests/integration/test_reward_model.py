"""Reward models on tiny VLMs: the scalar head on every family, training on ShapesWorld pairs and
ranked lists, encode-once batches, LoRA save/reload, resume, `vlmalign score`, bad data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlmalign.config import load_config
from vlmalign.data.batching import pad
from vlmalign.data.schema import ImageRef, Message
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.errors import DataError, VlmalignError
from vlmalign.methods.rm import RMCollator, RMConfig, RMMethod, evaluate_rm, load_rm_examples, train_rm
from vlmalign.models import adapter_for, build_tiny, families, load_adapter, save_tiny

from tiny_kinds import build_kind
from vlmalign.models.scalar_head import (HEAD_CONFIG, HEAD_WEIGHTS, ScalarModel, final_hidden_state,
                                         load_scalar_model)
from ports import free_port


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    generate_shapesworld(root / "data", ShapesConfig(seed=1, train_images=160, eval_images=32))
    save_tiny("llava", str(root / "model"))
    return root


def _cfg(world, out, *extra, data="dpo"):
    return load_config(RMConfig, None, [
        f"model.path={world / 'model'}", f"data.train_file={world / 'data' / f'{data}_train.json'}",
        "data.max_length=256", f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=8",
        "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant", *extra])


def _eval_scores(model, world, data="dpo", n=12):
    """Scores of the first n held-out records' candidates, in row order (right-padded batch)."""
    cfg = _cfg(world, "unused", data=data)
    ex, loader, _ = load_rm_examples(str(world / "data" / f"{data}_eval.json"), cfg.data, model.adapter,
                                     train=True, limit=n)
    model.eval()
    with torch.no_grad():
        return model.score(RMCollator(loader, model.adapter.tokenizer.pad_token_id)(ex))


# ----------------------------------------------------------------------------- every family
# every family, the composed projector kinds besides the perceiver and the generic fallback (tiny_kinds.py)
@pytest.mark.parametrize("family", families() + ["vlmalign_resampler:qformer", "vlmalign_resampler:linear",
                                                 "vlmalign_resampler:mlp2x_gelu", "generic"])
def test_scalar_head_reads_the_last_real_token_for_every_family(family):
    torch.manual_seed(0)
    m, p = build_kind(family)
    m.eval()
    ad = adapter_for(m, p)
    ims = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    inputs = [ad.preprocess_image(i) for i in ims]
    prompt = [Message.user(ImageRef(path="a.png"), "What colour is it?")]
    rows, idx = [], []
    for resp, k in (("red", 0), ("a blue square in the top left corner", 1), ("no idea at all", 0)):
        pi, ci, _ = ad.tokenize_completion(prompt, resp, [inputs[k]])
        rows.append(pi + ci)
        idx.append([k])
    enc = ad.encode_images(inputs, prompts=[prompt, prompt])
    pad_id = ad.tokenizer.pad_token_id
    with torch.no_grad():
        # the head reads the LM head's input: lm_head(final hidden state) reproduces the logits
        out = ad.forward(torch.tensor([rows[0]]), encoded=enc, image_indices=idx[:1], output_hidden_states=True,
                         use_cache=False)
        lm = m.get_output_embeddings()
        assert torch.allclose(lm(final_hidden_state(out))[0, -1], out.logits[0, -1], atol=1e-5)
        ScalarModel(ad, seed=0)  # from here on ad.forward runs the scalar model
        got = {}
        for side in ("right", "left"):
            ids, mask = pad(rows, pad_id, side), pad([[1] * len(r) for r in rows], 0, side)
            got[side] = ad.forward(ids, mask, encoded=enc, image_indices=idx).scores
        alone = torch.cat([ad.forward(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), encoded=enc,
                                      image_indices=[i]).scores for r, i in zip(rows, idx)])
    assert torch.allclose(got["right"], got["left"], atol=1e-5), (got["right"], got["left"])
    assert torch.allclose(got["right"], alone, atol=1e-5), (got["right"], alone)
    assert len(set(round(x, 4) for x in alone.tolist())) == 3  # different responses, different scores


def test_scores_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    m, p = build_tiny("llava")
    ad = adapter_for(m.to(torch.bfloat16), p)
    model = ScalarModel(ad, seed=0)
    prompt = [Message.user(ImageRef(path="a.png"), "Describe.")]
    inputs = [ad.preprocess_image(Image.new("RGB", (64, 64), "red"))]
    rows = [sum(ad.tokenize_completion(prompt, r, inputs)[:2], []) for r in ("a red circle", "a blue square")]
    ids = pad(rows, ad.tokenizer.pad_token_id)
    mask = pad([[1] * len(r) for r in rows], 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        s = ad.forward(ids, mask, encoded=ad.encode_images(inputs), image_indices=[[0], [0]]).scores
    assert s.dtype == torch.float32
    # scores computed in bf16 would sit on the bf16 grid (8 mantissa bits) and tie near neighbours
    assert not torch.equal(s, s.bfloat16().float()), s


# ----------------------------------------------------------------------------- learning (llava)
def test_rm_learns_shapesworld_rankings_and_reloads(world, tmp_path):
    # ranked lists: the correct caption, then captions with 1 and 2 errors (3 implied pairs each)
    cfg = _cfg(world, tmp_path / "run", "train.max_steps=40", f"data.eval_file={world / 'data' / 'ranked_eval.json'}",
               "train.save_every=20", data="ranked")
    # the model train_rm starts from: same weights, and the head from the same seeded init
    start = ScalarModel(load_adapter(str(world / "model")), seed=cfg.train.seed)
    ex, loader, _ = load_rm_examples(cfg.data.eval_file, cfg.data, start.adapter, train=True)
    before = evaluate_rm(start, ex, RMCollator(loader, start.adapter.tokenizer.pad_token_id), 16)
    result, model = train_rm(cfg)
    after = {k[len("eval/"):]: v for k, v in result.metrics.items() if k.startswith("eval/")}
    assert after["pairs"] == before["pairs"] == 96  # 32 held-out images x 3 pairs
    # measured (seeds 0, 1, 2): loss 0.68 -> 0.36, accuracy 0.61-0.67 -> 0.75-0.81. What a tiny
    # random model learns this fast is mostly textual (a caption with an extra object is longer);
    # the random head already scores by length a little, hence the start above 0.5.
    assert after["loss"] < before["loss"] - 0.2, (before, after)
    assert after["accuracy"] > before["accuracy"] and after["accuracy"] >= 0.7, (before, after)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/accuracy", "train/margin"} <= set(rows[0])
    # trainable groups moved, frozen ones (vision tower, the unused LM head) did not
    init = start.adapter.model.state_dict()
    now = model.adapter.model.state_dict()
    for g, params in model.adapter.param_groups().items():
        for name, _ in params:
            moved = not torch.equal(init[name], now[name])
            assert moved == (g in ("projector", "language")), (g, name)
    assert not torch.equal(start.head.weight, model.head.weight)
    # the checkpoint is a reward-model directory: same scores after reload
    ck = Path(result.checkpoint) / "model"
    assert (ck / HEAD_WEIGHTS).exists() and json.loads((ck / HEAD_CONFIG).read_text())["kind"] == "reward"
    mine = _eval_scores(model, world)
    again = _eval_scores(load_scalar_model(str(ck)), world)
    assert torch.allclose(mine, again, atol=1e-5)


def test_score_cli_writes_one_line_per_response(world, tmp_path):
    from vlmalign.cli.main import main
    result, model = train_rm(_cfg(world, tmp_path / "run", "train.max_steps=1"))
    ck = Path(result.checkpoint) / "model"
    out = tmp_path / "scores.jsonl"
    data = world / "data" / "ranked_eval.json"
    assert main(["score", "--model", str(ck), "--data", str(data), "--out", str(out), "--limit", "5",
                 "--batch-size", "2"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    recs = json.loads(data.read_text())[:5]
    responses = [r for rec in recs for r in rec["conversations"][-1]["value"]]
    assert len(lines) == len(responses) == 15          # 5 ranked lists x 3 responses
    assert [x["response"] for x in lines] == responses
    assert {x["images"][0] for x in lines} == {rec["image"] for rec in recs}
    # the scores are the model's: equal to the library's on the same candidates
    ref = _eval_scores(model, world, data="ranked", n=5)
    assert torch.allclose(torch.tensor([x["score"] for x in lines]), ref, atol=1e-5)
    # pairs: two lines per record, chosen then rejected
    out2 = tmp_path / "pairs.jsonl"
    assert main(["score", "--model", str(ck), "--data", str(world / "data" / "dpo_eval.json"), "--out", str(out2),
                 "--limit", "3"]) == 0
    assert [json.loads(x)["candidate"] for x in out2.read_text().splitlines()] == ["chosen", "rejected"] * 3


# ----------------------------------------------------------------------------- encode once
def test_each_image_is_encoded_once_per_record_per_step(world, tmp_path, monkeypatch):
    ad = load_adapter(str(world / "model"))
    seen = []
    real = RMMethod.compute_loss

    def spy(self, batch, num_items):
        calls, n = ad.encode_calls, ad.encoded_images
        out = real(self, batch, num_items)
        seen.append((ad.encode_calls - calls, ad.encoded_images - n, len(batch.images),
                     batch.tensors["input_ids"].shape[0], batch.size))
        return out

    monkeypatch.setattr(RMMethod, "compute_loss", spy)
    train_rm(_cfg(world, tmp_path / "run", "train.max_steps=2", data="ranked"), adapter=ad)
    assert len(seen) == 2
    for calls, encoded, unique, rows, records in seen:
        assert calls == 1                      # one encoder call per micro-batch
        assert encoded == unique == records    # one image per ranked list, each encoded once
        assert rows == 3 * records             # ... shared by its 3 candidates


def test_pairs_from_one_image_share_its_encoding(world):
    ad = load_adapter(str(world / "model"))
    cfg = _cfg(world, "unused")
    # ShapesWorld writes two pairs per image (a short answer and a caption) next to each other
    ex, loader, _ = load_rm_examples(cfg.data.train_file, cfg.data, ad, train=True, limit=8)
    batch = RMCollator(loader, ad.tokenizer.pad_token_id)(ex)
    ad.encode_calls = ad.encoded_images = 0
    batch.encode(ad)
    assert (ad.encode_calls, ad.encoded_images) == (1, 4)   # 8 pairs, 16 rows, 4 images
    assert batch.tensors["input_ids"].shape[0] == 16
    assert batch.image_indices[:4] == [[0], [0], [0], [0]]


# ----------------------------------------------------------------------------- ranked lists
def test_ranked_lists_in_vision_llm_alignment_format_train(world, tmp_path):
    # Vision-LLM-Alignment's ranked format: LLaVA conversations whose last gpt value is a list,
    # best first; lists of different lengths in one file
    data = [
        {"id": "a", "image": "images/train_00000.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": ["A red circle.", "A blue square.", "Nothing."]}]},
        {"id": "b", "image": "images/train_00001.png", "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"},
            {"from": "gpt", "value": ["Shapes.", "A cat."]}]},
    ] * 4
    f = world / "data" / "ranked_vla.json"
    f.write_text(json.dumps(data))
    for loss in ("pairwise", "plackett_luce"):
        result, model = train_rm(_cfg(world, tmp_path / loss, f"data.train_file={f}", "train.max_steps=4",
                                      f"rm.list_loss={loss}"))
        rows = [json.loads(x) for x in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(r["train/items"] == 8 for r in rows)
        assert rows[-1]["train/loss"] < rows[0]["train/loss"], (loss, [r["train/loss"] for r in rows])


def test_ranked_list_margins_come_from_scores(world, tmp_path):
    f = world / "data" / "ranked_scored.json"
    f.write_text(json.dumps([{"image": "images/train_00000.png", "scores": [3.0, 1.5, 0.0],
                              "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                {"from": "gpt", "value": ["good", "fair", "bad"]}]}]))
    ad = load_adapter(str(world / "model"))
    cfg = _cfg(world, tmp_path, f"data.train_file={f}", "rm.margin=true")
    ex, loader, _ = load_rm_examples(str(f), cfg.data, ad, train=True, margin=True)
    t = RMCollator(loader, ad.tokenizer.pad_token_id)(ex).tensors
    # pairs (0,1), (0,2), (1,2): margins 3-1.5, 3-0, 1.5-0
    assert t["pair_better"].tolist() == [0, 0, 1] and t["pair_worse"].tolist() == [1, 2, 2]
    assert t["pair_margin"].tolist() == [1.5, 3.0, 1.5]
    with pytest.raises(DataError, match=r"dpo_train.json: record 0: field 'margin': rm.margin=true needs"):
        train_rm(_cfg(world, tmp_path / "m", "rm.margin=true"))
    with pytest.raises(VlmalignError, match="pairwise only"):
        train_rm(_cfg(world, tmp_path / "m2", "rm.margin=true", "rm.list_loss=plackett_luce"))


# ----------------------------------------------------------------------------- LoRA, other family
def test_lora_rm_saves_reloads_and_resumes(world, tmp_path):
    args = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "train.max_steps=4", "train.save_every=2",
            "train.keep_last=5", "model.path=null", "model.tiny=llava"]
    result, model = train_rm(_cfg(world, tmp_path / "run", *args))
    ck = Path(result.checkpoint) / "model"
    assert (ck / "adapter_config.json").exists() and (ck / HEAD_WEIGHTS).exists()
    assert json.loads((ck / HEAD_CONFIG).read_text())["lora"] is True
    mine = _eval_scores(model, world)
    again = _eval_scores(load_scalar_model(str(ck)), world)
    assert torch.allclose(mine, again, atol=1e-5), (mine, again)
    # resume from step 2 reproduces step 4 (adapter, projector copy and head)
    final = {f: load_file(str(ck / f)) for f in ("adapter_model.safetensors", HEAD_WEIGHTS)}
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")
    train_rm(_cfg(world, tmp_path / "run", *args, "train.resume=true"))
    for f, want in final.items():
        got = load_file(str(ck / f))
        for k in want:
            assert torch.allclose(got[k], want[k], atol=1e-6), (f, k)


def test_qwen2_vl_reward_model_trains_and_scores(world, tmp_path):
    result, model = train_rm(_cfg(world, tmp_path / "run", "model.path=null", "model.tiny=qwen2_vl",
                                  "train.max_steps=3", "data.max_train_samples=24"))
    assert model.adapter.family == "qwen2_vl" and result.step == 3
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
    ck = Path(result.checkpoint) / "model"
    mine = _eval_scores(model, world, n=4)
    assert torch.allclose(mine, _eval_scores(load_scalar_model(str(ck)), world, n=4), atol=1e-5)


# ----------------------------------------------------------------------------- resume (full)
def test_resume_restores_the_head_and_matches_an_uninterrupted_run(world, tmp_path):
    args = ["train.max_steps=4", "train.save_every=2", "train.keep_last=10"]
    train_rm(_cfg(world, tmp_path / "run", *args))
    ck = tmp_path / "run" / "checkpoints"
    want = {f: load_file(str(ck / "step-4" / "model" / f)) for f in ("model.safetensors", HEAD_WEIGHTS)}
    shutil.rmtree(ck / "step-4")  # as if killed after the step-2 checkpoint
    result, _ = train_rm(_cfg(world, tmp_path / "run", *args, "train.resume=true"))
    assert result.step == 4
    for f, w in want.items():
        got = load_file(str(ck / "step-4" / "model" / f))
        for k in w:
            assert (got[k] - w[k]).abs().max().item() <= 1e-6, (f, k)
    assert not torch.equal(want[HEAD_WEIGHTS]["weight"],
                           load_file(str(ck / "step-2" / "model" / HEAD_WEIGHTS))["weight"])  # the head trains
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- bad data
def test_bad_pairs_are_refused_with_their_location(world, tmp_path):
    data = json.loads((world / "data" / "dpo_train.json").read_text())[:6]
    missing = [dict(r) for r in data]
    missing[2]["image"] = "images/missing.png"
    f = world / "data" / "bad_image.json"
    f.write_text(json.dumps(missing))
    with pytest.raises(DataError, match=r"bad_image.json: record 2: .*image file not found"):
        train_rm(_cfg(world, tmp_path / "a", f"data.train_file={f}"))
    empty = [dict(r) for r in data]
    empty[4]["rejected"] = "  "
    f = world / "data" / "bad_empty.json"
    f.write_text(json.dumps(empty))
    with pytest.raises(DataError, match=r"bad_empty.json: record 4: field 'rejected': empty or missing response"):
        train_rm(_cfg(world, tmp_path / "b", f"data.train_file={f}"))
    # records that are not comparisons cannot train a reward model
    with pytest.raises(DataError, match=r"kto_train.jsonl: record 0: field 'kind': unpaired records cannot train"):
        train_rm(_cfg(world, tmp_path / "c", f"data.train_file={world / 'data' / 'kto_train.jsonl'}"))


def test_quickstart_rm_recipe_trains_one_step(world, tmp_path):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "rm.yaml"
    cfg = load_config(RMConfig, recipe, [
        f"model.path={world / 'model'}",   # the recipe starts from the quickstart's SFT checkpoint
        f"data.train_file={world / 'data' / 'ranked_train.json'}",
        f"data.eval_file={world / 'data' / 'ranked_eval.json'}",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.batch_size=4", "train.progress=false",
        "data.max_eval_samples=4"])
    result, model = train_rm(cfg)
    assert result.step == 1 and "eval/accuracy" in result.metrics
    assert (Path(result.checkpoint) / "model" / HEAD_WEIGHTS).exists()


@pytest.mark.slow
def test_two_processes_match_one_including_the_head(world, tmp_path):
    import os
    import subprocess
    import sys
    common = ["train", "rm", f"model.path={world / 'model'}", f"data.train_file={world / 'data' / 'dpo_train.json'}",
              "data.max_length=256", "train.max_steps=3", "train.progress=false", "optim.lr=1e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "vlmalign", *common, "train.batch_size=4", f"train.output_dir={one}"],
                   check=True, env=env, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "vlmalign", *common, "train.batch_size=2", f"train.output_dir={two}"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    la, lb = ([json.loads(x)["train/loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    assert len(la) == len(lb) == 3 and all(abs(x - y) <= 1e-5 for x, y in zip(la, lb)), (la, lb)
    # the head is inside the module DDP wraps: its gradients are reduced over both processes
    ha, hb = (load_file(str(d / "checkpoints" / "step-3" / "model" / HEAD_WEIGHTS)) for d in (one, two))
    for k in ha:
        if k.endswith("bias"):
            # a pairwise loss sees only score differences: the bias's gradient is 0 up to rounding,
            # which Adam scales to steps of up to lr, differently in each run (3 steps, lr 1e-3)
            assert ha[k].abs().max() <= 3e-3 + 1e-6 and hb[k].abs().max() <= 3e-3 + 1e-6, k
            continue
        assert torch.allclose(ha[k], hb[k], atol=1e-6), k
