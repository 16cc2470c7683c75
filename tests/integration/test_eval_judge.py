"""Judge evaluation end to end with tiny random-init judges: a VLM judge (both orders of a pair
share one image encoding) and a text-only causal LM judge, through `vlmalign eval`'s runner."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmalign.config import ConfigError
from vlmalign.data.schema import ImageRef
from vlmalign.eval.items import EvalItem
from vlmalign.eval.judge import Judge
from vlmalign.eval.runner import EvalConfig, evaluate
from vlmalign.models import adapter_for, build_tiny, save_tiny


def _items(root, n=3):
    for i in range(n):
        Image.new("RGB", (32, 32), ["red", "green", "blue"][i % 3]).save(root / f"i{i}.png")
    return [EvalItem(id=f"q{i}", question="What colour is the image?", images=[ImageRef(path=f"i{i}.png")],
                     answer=["red", "green", "blue"][i % 3], source="q.jsonl", index=i) for i in range(n)]


def test_vlm_judge_pairwise_both_orders_share_one_encoding(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ad = adapter_for(*build_tiny("llava"))
    items = _items(tmp_path)
    seen = []
    inner = ad.encode_images
    monkeypatch.setattr(ad, "encode_images", lambda imgs, **k: seen.append(len(imgs)) or inner(imgs, **k))
    judge = Judge(ad, image_root=tmp_path, batch_size=6, max_new_tokens=4)
    rows, m = judge.pairwise(items, ["red", "red", "red"], ["blue", "green", "blue"])
    assert seen == [3]                 # 6 prompts (3 items x 2 orders) in one batch, 3 images
    assert len(rows) == 3 and all(len(r["verdicts"]) == 2 for r in rows)
    assert m["n"] == 3 and m["consistent"] + m["inconsistent"] + m["unparsable"] == 3
    rows, m = judge.pointwise(items, ["red", "x", "blue"])
    assert m["n"] == 3 and m["scored"] + m["unparsable"] == 3
    assert all("judge_prompt" in r and "Reference answer" in r["judge_prompt"] for r in rows)


def _text_judge(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmalign.models.tiny_tokenizer import build_tiny_tokenizer
    tok = build_tiny_tokenizer([], pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    d = tmp_path / "text_judge"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_eval_judge_tasks_through_the_runner(tmp_path):
    items = _items(tmp_path)
    model_dir = tmp_path / "vlm"
    save_tiny("llava", str(model_dir))
    preds = tmp_path / "a.jsonl"
    preds.write_text("".join(json.dumps({"id": it.id, "prediction": a}) + "\n"
                             for it, a in zip(items, ["red", "green", "pink"])))
    base = tmp_path / "b.jsonl"
    base.write_text("".join(json.dumps({"question_id": it.id, "text": "no idea"}) + "\n" for it in items))
    text_judge = _text_judge(tmp_path)
    res = evaluate(EvalConfig(task="judge-pairwise", predictions=str(preds), baseline=str(base),
                              judge=str(text_judge), judge_text_only=True, judge_max_new_tokens=4,
                              out=str(tmp_path / "pair"), progress=False), items=items, image_root=str(tmp_path))
    assert res.metrics["n"] == 3
    rows = [json.loads(x) for x in (tmp_path / "pair" / "predictions.jsonl").read_text().splitlines()]
    assert [r["baseline"] for r in rows] == ["no idea"] * 3 and all("outcome" in r for r in rows)
    res = evaluate(EvalConfig(task="judge-pointwise", predictions=str(preds), judge=str(model_dir),
                              judge_max_new_tokens=4, progress=False), items=items, image_root=str(tmp_path),
                   write=False)
    assert res.metrics["n"] == 3 and res.metrics["scored"] + res.metrics["unparsable"] == 3
    with pytest.raises(ConfigError, match="baseline"):
        evaluate(EvalConfig(task="judge-pairwise", predictions=str(preds), judge=str(model_dir)), items=items,
                 write=False)
