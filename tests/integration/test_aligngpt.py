"""AlignGPT alignment levels (models/aligngpt.py, models/alignment_scores.py): the pretraining
bucket reaches the loss, fine-tuning trains the gate with the indicators frozen, a saved model
reloads to the same logits, `vlmalign data align-levels` writes quantile buckets, bad records are
named."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from vlmalign.config import load_config
from vlmalign.data.batching import SFTCollator
from vlmalign.data.loading import load_examples
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.errors import DataError
from vlmalign.methods.sft import PretrainConfig, SFTConfig, SFTMethod, train_sft
from vlmalign.models import adapter_for, build_tiny, load_adapter, save_tiny

N = 8


def _cli(*argv: str) -> tuple[int, str]:
    from vlmalign.cli.main import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


def _with_buckets(src: Path, dst: Path, buckets=None) -> Path:
    recs = json.loads(src.read_text())
    for i, r in enumerate(recs):
        r["similarity"] = (i % N) if buckets is None else buckets(i)
    dst.write_text(json.dumps(recs))
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligngpt")
    generate_shapesworld(root / "data", ShapesConfig(seed=3, train_images=8, eval_images=2, max_turns=1))
    data = root / "data"
    _with_buckets(data / "captions_train.json", data / "captions_levels.json")
    save_tiny("vlmalign_aligngpt", str(root / "model"))
    return root


def _cfg(world, out, cls, *extra):
    return load_config(cls, None, [
        f"model.path={world / 'model'}", f"data.train_file={world / 'data' / 'captions_levels.json'}",
        "data.max_length=256", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=4",
        "train.progress=false", "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", *extra],
        base=cls())


def _pretrain_batch(adapter, world, file="captions_levels.json"):
    cfg = _cfg(world, world / "unused", PretrainConfig)
    adapter.stage = "pretrain"

    def tok(rec, imgs):
        t = adapter.tokenize_record(rec, imgs, max_length=256)
        return {"input_ids": t.input_ids, "labels": t.labels, **adapter.record_inputs(rec, stage="pretrain")}
    examples, loader, _ = load_examples(str(world / "data" / file), cfg.data, adapter, tok, kind="conversation")
    return SFTCollator(loader, adapter.tokenizer.pad_token_id)(examples[:4])


def test_the_bucket_of_a_sample_changes_the_pretraining_loss(world):
    adapter = load_adapter(str(world / "model"))
    batch = _pretrain_batch(adapter, world)
    assert batch.tensors["alignment_level"].tolist() == [0, 1, 2, 3]
    method = SFTMethod(adapter)
    n = method.count_items(batch)
    with torch.no_grad():
        a, _ = method.compute_loss(batch, n)
        again, _ = method.compute_loss(batch, n)
        batch.tensors["alignment_level"] = torch.tensor([7, 6, 5, 4])
        b, _ = method.compute_loss(batch, n)
        del batch.tensors["alignment_level"]   # the gate instead of the bucket
        c, _ = method.compute_loss(batch, n)
    assert torch.equal(a, again)
    assert abs(a.item() - b.item()) > 1e-4 and abs(a.item() - c.item()) > 1e-4


def test_the_option_converts_a_llava_and_pretraining_trains_its_indicators(world, tmp_path):
    # model.alignment_levels turns a plain tiny LLaVA into an AlignGPT model before the run
    from vlmalign.methods.setup import with_alignment_levels
    cfg = _cfg(world, tmp_path / "pre", PretrainConfig, "model.path=null", "model.tiny=llava",
               f"model.alignment_levels={N}")
    fresh = with_alignment_levels(adapter_for(*build_tiny("llava")), cfg.model)   # the run's start (seed 0)
    before = fresh.model.state_dict()
    _, adapter = train_sft(cfg)
    after = adapter.model.state_dict()
    assert adapter.model.config.model_type == "vlmalign_aligngpt"
    moved = (after["model.alignment.indicators"] - before["model.alignment.indicators"]).abs().sum(1)
    assert moved.shape == (N,) and (moved > 0).all(), moved   # buckets 0..7 all occur in the 8 records
    for k in ("model.alignment.gate.0.weight", "model.alignment.gate.2.weight"):
        assert torch.equal(after[k], before[k])                 # the gate takes no part in pretraining
    saved = load_adapter(str(tmp_path / "pre" / "checkpoints" / "step-2" / "model"))
    assert torch.equal(saved.model.model.alignment.indicators, adapter.model.model.alignment.indicators)


def test_fine_tuning_trains_the_gate_and_keeps_the_indicators_frozen(world, tmp_path):
    before = load_adapter(str(world / "model")).model.state_dict()
    cfg = _cfg(world, tmp_path / "sft", SFTConfig, f"data.train_file={world / 'data' / 'vqa_train.json'}")
    _, adapter = train_sft(cfg)
    after = adapter.model.state_dict()
    assert torch.equal(after["model.alignment.indicators"], before["model.alignment.indicators"])
    assert not adapter.model.model.alignment.indicators.requires_grad
    for k in ("model.alignment.gate.0.weight", "model.alignment.gate.2.weight"):
        assert not torch.equal(after[k], before[k]), f"{k} did not move"


def test_lora_fine_tuning_keeps_the_indicators_frozen_in_peft_copies(world, tmp_path):
    before = load_adapter(str(world / "model")).model.state_dict()
    cfg = _cfg(world, tmp_path / "lora", SFTConfig, f"data.train_file={world / 'data' / 'vqa_train.json'}",
               "lora.enabled=true")
    _, adapter = train_sft(cfg)
    copies = {n: p for n, p in adapter.model.named_parameters() if ".alignment.modules_to_save." in n}
    assert copies, "the projector's alignment module is a PEFT modules_to_save copy"
    for n, p in copies.items():
        key = "model.alignment." + n.split(".modules_to_save.default.")[1]
        assert p.requires_grad == (key != "model.alignment.indicators"), n
        assert torch.equal(p.detach(), before[key]) == (key == "model.alignment.indicators"), n


def test_save_and_reload_give_identical_logits(world, tmp_path):
    adapter = load_adapter(str(world / "model"))
    batch = _pretrain_batch(adapter, world)
    levels = batch.tensors.pop("alignment_level")
    adapter.save_pretrained(str(tmp_path / "copy"))
    again = load_adapter(str(tmp_path / "copy"))
    assert type(again) is type(adapter) and again.model.config.alignment_levels == N
    with torch.no_grad():
        for kw in ({}, {"alignment_level": levels}):
            a = adapter.forward(batch.tensors["input_ids"], batch.tensors["attention_mask"],
                                encoded=batch.encode(adapter), image_indices=batch.image_indices, **kw).logits
            b = again.forward(batch.tensors["input_ids"], batch.tensors["attention_mask"],
                              encoded=batch.encode(again), image_indices=batch.image_indices, **kw).logits
            assert torch.equal(a, b)


def test_the_align_token_follows_bos_and_generation_runs(world):
    adapter = load_adapter(str(world / "model"))
    batch = _pretrain_batch(adapter, world)
    ids = batch.tensors["input_ids"]
    align = adapter.model.config.alignment_token_id
    assert (ids[:, 0] == adapter.tokenizer.bos_token_id).all() and (ids[:, 1] == align).all()
    first = int((batch.tensors["labels"][0] != -100).nonzero()[0])   # the prompt: up to the answer
    out = adapter.generate(ids[:1, :first], torch.ones(1, first, dtype=torch.long), encoded=batch.encode(adapter),
                           image_indices=batch.image_indices[:1], max_new_tokens=3, do_sample=False)
    assert out.shape[1] == first + 3


def test_missing_or_out_of_range_bucket_is_named(world, tmp_path):
    adapter = load_adapter(str(world / "model"))
    data = world / "data"
    recs = json.loads((data / "captions_levels.json").read_text())
    del recs[2]["similarity"]
    (data / "missing.json").write_text(json.dumps(recs))
    with pytest.raises(DataError) as e:
        _pretrain_batch(adapter, world, "missing.json")
    assert e.value.file.endswith("missing.json") and e.value.index == 2 and e.value.field == "similarity"
    assert "missing" in str(e.value)
    _with_buckets(data / "captions_train.json", data / "range.json", lambda i: N if i == 5 else 0)
    with pytest.raises(DataError) as e:
        _pretrain_batch(adapter, world, "range.json")
    assert e.value.file.endswith("range.json") and e.value.index == 5 and e.value.field == "similarity"
    assert "out of range" in str(e.value) and f"0..{N - 1}" in str(e.value)
    # through the run, too (train pretrain stops before any step)
    with pytest.raises(DataError, match=r"range\.json: record 5: field 'similarity'"):
        train_sft(_cfg(world, tmp_path / "bad", PretrainConfig, f"data.train_file={data / 'range.json'}"))
    # fine-tuning does not read the field
    assert adapter.record_inputs(type("R", (), {"meta": {}})(), stage="finetune") == {}


def test_train_pretrain_command_reads_the_buckets_and_names_a_bad_one(world, tmp_path):
    from vlmalign.cli.main import main
    common = [f"model.path={world / 'model'}", "data.max_length=256", "train.max_steps=1", "train.batch_size=4",
              "train.progress=false"]
    assert main(["train", "pretrain", *common, f"data.train_file={world / 'data' / 'captions_levels.json'}",
                 f"train.output_dir={tmp_path / 'ok'}"]) == 0
    recs = json.loads((world / "data" / "captions_levels.json").read_text())
    del recs[2]["similarity"]
    (world / "data" / "missing_cli.json").write_text(json.dumps(recs))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "pretrain", *common, f"data.train_file={world / 'data' / 'missing_cli.json'}",
                   f"train.output_dir={tmp_path / 'bad'}"])
    assert rc != 0 and "missing_cli.json: record 2: field 'similarity': missing" in err.getvalue()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        main(["train", "pretrain", "--help"])
    assert "alignment_levels" in out.getvalue()


def _tiny_clip(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from vlmalign.models.tiny_tokenizer import build_tiny_tokenizer
    tok = build_tiny_tokenizer(["<s>", "</s>", "<pad>", "<unk>"], bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", unk_token="<unk>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_align_levels_writes_quantile_buckets_with_a_tiny_clip(world, tmp_path):
    clip = _tiny_clip(tmp_path / "clip")
    src, out = world / "data" / "captions_train.json", tmp_path / "levels.json"
    # the output file lives elsewhere: its images are found through --image-root
    rc, printed = _cli("data", "align-levels", str(src), "--scorer", str(clip), "--buckets", "4",
                       "--out", str(out), "--image-root", str(world / "data"))
    assert rc == 0 and "wrote 8 records" in printed and "2, 2, 2, 2" in printed
    recs, orig = json.loads(out.read_text()), json.loads(src.read_text())
    assert [{k: v for k, v in r.items() if not k.startswith("similarity")} for r in recs] == orig
    scores = [r["similarity_score"] for r in recs]
    order = sorted(range(8), key=lambda i: scores[i])
    assert [recs[i]["similarity"] for i in order] == [0, 0, 1, 1, 2, 2, 3, 3]
    # the composed / LLaVA model's own features score too
    rc, printed = _cli("data", "align-levels", str(src), "--scorer", str(world / "model"), "--buckets", str(N),
                       "--out", str(tmp_path / "own.jsonl"), "--image-root", str(world / "data"))
    own = [json.loads(x) for x in (tmp_path / "own.jsonl").read_text().splitlines()]
    assert rc == 0 and sorted(r["similarity"] for r in own) == list(range(N))


def test_align_levels_names_a_record_without_an_image(world, tmp_path):
    from vlmalign.models.alignment_scores import align_levels
    recs = json.loads((world / "data" / "captions_train.json").read_text())
    recs[1].pop("image")
    recs[1]["conversations"][0]["value"] = "Describe it."
    (tmp_path / "noimg.json").write_text(json.dumps(recs))
    with pytest.raises(DataError) as e:
        align_levels(str(tmp_path / "noimg.json"), str(world / "model"), str(tmp_path / "o.json"), buckets=4)
    assert e.value.index == 1 and e.value.field == "image" and e.value.file.endswith("noimg.json")


def test_sequence_packing_is_refused_by_name(world):
    from vlmalign.errors import ModelError
    with pytest.raises(ModelError, match="vlmalign_aligngpt: data.packing is not supported: a row holds one <align>"):
        load_adapter(str(world / "model")).check_packing()
