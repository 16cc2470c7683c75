"""Using what was trained: LoRA export, batch generation, terminal chat."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vlmalign.cli.main import main
from vlmalign.config import load_config
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.methods.sft import SFTConfig, train_sft


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    generate_shapesworld(root / "data", ShapesConfig(seed=2, train_images=12, eval_images=3))
    cfg = load_config(SFTConfig, None, [
        "model.tiny=llava", f"data.train_file={root / 'data' / 'vqa_train.json'}", "data.max_length=256",
        f"train.output_dir={root / 'run'}", "train.max_steps=3", "train.batch_size=4", "train.progress=false",
        "lora.enabled=true", "lora.r=4", "optim.lr=5e-2", "model.train_projector=true"])
    result, adapter = train_sft(cfg)
    return root, root / "run" / "checkpoints" / "step-3" / "model"


def _prompt_ids(ad, root):
    from vlmalign.data.batching import ImageLoader
    from vlmalign.data.readers import read_file
    rec = read_file(root / "data" / "vqa_eval.json", kind="rl_prompt")[0]
    loader = ImageLoader(ad, root / "data")
    imgs = [loader.inputs(r) for r in rec.images]
    t = ad.tokenize_prompt(rec.prompt, imgs)
    enc = ad.encode_images(imgs)
    return torch.tensor([t.input_ids]), ad.mm_kwargs(enc, list(range(len(imgs))))


def test_lora_checkpoint_is_an_adapter_with_the_projector(lora_run):
    root, ck = lora_run
    cfg = json.loads((ck / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["model.multi_modal_projector"]
    assert os.path.isdir(cfg["base_model_name_or_path"])


def test_export_merges_and_generates_the_same_tokens(lora_run, tmp_path):
    root, ck = lora_run
    out = tmp_path / "merged"
    assert main(["export", "--model", str(ck), "--out", str(out)]) == 0
    from transformers import AutoModelForImageTextToText

    from vlmalign.models import adapter_for
    from vlmalign.models.loading import load_processor
    from vlmalign.models.peft import load_with_adapter
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (out / "vlmalign_prompt.json").read_text() == (ck / "vlmalign_prompt.json").read_text()
    peft_model, processor = load_with_adapter(str(ck))
    peft_model.eval()
    ad_merged = adapter_for(merged, load_processor(str(out)))
    ad_peft = adapter_for(peft_model.base_model.model, processor)
    ids, kw = _prompt_ids(ad_peft, root)
    ids2, kw2 = _prompt_ids(ad_merged, root)
    assert torch.equal(ids, ids2)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        a = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw, **gen)
        b = merged.generate(input_ids=ids2, attention_mask=torch.ones_like(ids2), **kw2, **gen)
        la = peft_model(input_ids=ids, **kw).logits
        lb = merged(input_ids=ids2, **kw2).logits
    assert torch.equal(a, b)
    assert (la - lb).abs().max().item() < 1e-4
    # and the adapter really changed the model: the base alone gives other logits
    with peft_model.disable_adapter(), torch.no_grad():
        base_logits = peft_model(input_ids=ids, **kw).logits
    assert (base_logits - la).abs().max().item() > 1e-3


def test_generate_cli_writes_one_line_per_record(lora_run, tmp_path):
    root, ck = lora_run
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(ck), "--data", str(root / "data" / "vqa_eval.json"),
                 "--out", str(out), "--max-new-tokens", "4", "--num-samples", "2", "--temperature", "1.0",
                 "--limit", "5"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["responses"]) == 2 for r in rows)
    assert rows[0]["reference"] and rows[0]["images"]


def test_export_refuses_to_write_over_the_adapter_or_its_base(lora_run, capsys):
    root, ck = lora_run
    base = json.loads((ck / "adapter_config.json").read_text())["base_model_name_or_path"]
    before = sorted(os.listdir(base))
    for out in (base, os.path.join(base, "merged"), str(ck)):
        assert main(["export", "--model", str(ck), "--out", out]) == 2
        assert "would overwrite the input" in capsys.readouterr().err
    assert sorted(os.listdir(base)) == before


def test_training_writes_where_its_prompts_put_the_images(lora_run):
    root, ck = lora_run
    n = len(json.loads((root / "data" / "vqa_train.json").read_text()))  # "<image>\nquestion" records
    assert json.loads((ck / "vlmalign_prompt.json").read_text()) == {
        "image_position": "before", "counts": {"before": n, "after": 0, "inside": 0}}


def test_chat_in_a_terminal(lora_run, tmp_path):
    root, ck = lora_run
    img = sorted((root / "data" / "images").glob("eval_*.png"))[0]
    script = (f"/help\n/image {img}\nWhat colour is the shape in the top left?\nAnd now?\n/image nope.png\n"
              "/image\nwhat is <image> here?\n/imag foo\n/foo\n//slash first\n/reset\nHi\n/quit\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "vlmalign", "chat", "--model", str(ck), "--max-new-tokens", "5"],
                       input=script, capture_output=True, text=True, env=env, cwd=str(root), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "images go before your text" in out      # the model's layout, from its training data
    assert "/image PATH" in out                      # help shown
    assert "will be shown with your next message" in out
    assert "error:" in out and "nope.png" in out     # missing image refused clearly
    assert "usage: /image PATH" in out               # no path given
    assert "<image> in a message is this model's image placeholder" in out and "conversation is kept" in out
    assert "unknown command /imag (did you mean /image?)" in out and "unknown command /foo" in out
    assert out.count("model> ") == 5                 # 2 answers + the refused <image> turn + //slash + Hi
    assert "(conversation reset)" in out


def test_chat_survives_ctrl_c_at_the_prompt_and_during_an_answer(lora_run, monkeypatch, capsys):
    root, ck = lora_run
    from vlmalign.cli import chat
    lines = iter([KeyboardInterrupt, "first", "second", "third"])

    def scripted(prompt=""):
        line = next(lines, EOFError)
        if isinstance(line, type) and issubclass(line, BaseException):
            raise line
        return line

    sessions = []
    real_ask = chat.ChatSession.ask

    def ask(self, text, out=sys.stdout):
        sessions.append(self)
        if text == "second":  # Ctrl-C while the answer streams
            raise KeyboardInterrupt
        return real_ask(self, text, out=out)

    monkeypatch.setattr("builtins.input", scripted)
    monkeypatch.setattr(chat.ChatSession, "ask", ask)
    assert main(["chat", "--model", str(ck), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "line cleared" in out and "answer stopped" in out
    s = sessions[-1]
    assert [m.text for m in s.messages if m.role == "user"] == ["first", "third"]


def test_chat_places_images_as_the_model_was_trained(lora_run, tmp_path):
    root, ck = lora_run
    from vlmalign.cli.chat import ChatSession
    from vlmalign.data.schema import ImagePart
    from vlmalign.models.peft import load_any
    ad = load_any(str(ck))
    img = sorted((root / "data" / "images").glob("eval_*.png"))[0]
    for position, first in (("after", False), ("before", True)):
        s = ChatSession(ad, image_root=str(root), max_new_tokens=2, image_position=position)
        s.add_image(str(img))
        m = s.message("Where is the square?")
        assert isinstance(m.content[0], ImagePart) is first and len(m.images) == 1


def test_chat_session_keeps_history_and_encodes_each_image_once(lora_run):
    root, ck = lora_run
    from vlmalign.cli.chat import ChatSession
    from vlmalign.models.peft import load_any
    ad = load_any(str(ck))
    s = ChatSession(ad, image_root=str(root), max_new_tokens=3)
    img = sorted((root / "data" / "images").glob("eval_*.png"))[0]
    s.add_image(str(img))
    import io
    s.ask("What colour?", out=io.StringIO())
    s.ask("And the shape?", out=io.StringIO())
    assert len(s.messages) == 4 and s.messages[0].images
    assert ad.encoded_images == 1  # the second turn reused the first turn's features
