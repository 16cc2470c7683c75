"""scripts/self_critique_pipeline.py end to end on a tiny ShapesWorld, a few steps per stage: every
stage leaves its output, the ensemble is the base plus the mean of the members' LoRA updates
(computed here from the adapter files), and a judge that keeps no pair stops the pipeline before
DPO with exit status 3 and says so in the report. The tiny random model cannot judge, so the
judge is replaced by fakes (the real one is measured in docs/PREFERENCE.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmalign.methods.self_critique import VLMJudge

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["--members", "2", "--lrs", "1e-3,3e-3", "--steps-scale", "0.002", "--train-images", "16",
         "--eval-images", "4", "--judge-pairs", "4", "--prompts", "4", "--n", "3"]


def _driver():
    path = ROOT / "scripts" / "self_critique_pipeline.py"
    spec = importlib.util.spec_from_file_location("self_critique_pipeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _shorter(self, requests):   # position-free: prefers the shorter response in either order
    return ["A" if (len(r.response_a), r.response_a) < (len(r.response_b), r.response_b) else "B" for r in requests]


def _updates(member: Path) -> tuple[dict, dict]:
    """(model key -> s·B@A, model key -> fully trained tensor) of one LoRA checkpoint."""
    cfg = json.loads((member / "adapter_config.json").read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and not cfg.get("use_rslora")
    scale = cfg["lora_alpha"] / cfg["r"]
    w = load_file(member / "adapter_model.safetensors")
    delta, full = {}, {}
    for k, v in w.items():
        name = k.removeprefix("base_model.model.")
        if ".lora_A." in k:
            b = w[k.replace(".lora_A.", ".lora_B.")]
            delta[name.replace(".lora_A.weight", ".weight")] = scale * b.double() @ v.double()
        elif ".lora_B." not in k:
            full[name.replace(".modules_to_save.default", "")] = v.double()
    extra = member / "extra_params.safetensors"
    if extra.exists():
        full.update({k: v.double() for k, v in load_file(extra).items()})
    return delta, full


def _weights(model_dir: Path) -> dict:
    """A full model's tensors under their module names (the names PEFT's keys carry)."""
    from vlmalign.models.peft import load_any
    return {k: v.double() for k, v in load_any(str(model_dir)).model.state_dict().items()}


def test_pipeline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(VLMJudge, "__call__", _shorter)
    out = tmp_path / "sc"
    assert _driver().main(["--out", str(out), *SMOKE]) == 0
    for path in ("commands.sh", "data/sft_judge_train.jsonl", "ensemble/config.json",
                 "data/self_critique.jsonl", "data/self_critique.summary.json", "report.md"):
        assert (out / path).exists(), path
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"member0", "member1", "ensemble", "dpo"}
    for row in report["models"].values():
        assert 0.0 <= row["vqa_accuracy"] <= 1.0 and 0.0 <= row["pope_f1"] <= 1.0 and "chair_i" in row
    assert report["preferences"]["pairs"] > 0 and (Path(report["models"]["dpo"]["path"]) / "config.json").exists()
    assert report["models"]["member0"]["judge"]["pairs"] == 8   # 4 held-out images x 2 pairs

    commands = (out / "commands.sh").read_text()
    for cmd in ("data synth shapes", "data judge-sft", "train sft", "merge --method mean", "generate-preferences",
                "--judge self", "train dpo", "eval --task chair"):
        assert cmd in commands, cmd

    members = [Path(report["models"][f"member{i}"]["path"]) for i in range(2)]
    base = _weights(Path(json.loads((members[0] / "adapter_config.json").read_text())["base_model_name_or_path"]))
    merged = _weights(out / "ensemble")
    (d0, f0), (d1, f1) = _updates(members[0]), _updates(members[1])
    assert d0.keys() == d1.keys() and len(d0) > 0 and f0.keys() == f1.keys()
    for k in d0:
        expected = base[k] + (d0[k] + d1[k]) / 2
        assert torch.allclose(merged[k], expected, atol=1e-6), k
    for k in f0:
        assert torch.allclose(merged[k], (f0[k] + f1[k]) / 2, atol=1e-6), k
    for k in merged.keys() - d0.keys() - f0.keys():
        assert torch.equal(merged[k], base[k]), k


def test_no_pair_kept_stops_before_dpo(tmp_path, monkeypatch):
    monkeypatch.setattr(VLMJudge, "__call__", lambda self, requests: ["A"] * len(requests))  # position bias only
    out = tmp_path / "sc"
    assert _driver().main(["--out", str(out), *SMOKE, "--members", "2"]) == 3
    report = json.loads((out / "report.json").read_text())
    assert report["preferences"]["pairs"] == 0 and "dpo" not in report["models"]
    assert report["dpo"].startswith("not trained")
    assert "DPO not trained" in (out / "report.md").read_text()
    assert not (out / "dpo").exists()
    with pytest.raises(SystemExit):
        _driver().main(["--out", str(out), *SMOKE])   # a non-empty --out without --overwrite
