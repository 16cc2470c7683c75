"""`vlmalign merge` on tiny random-init LLaVA models: the merged full weights equal the hand-computed
mean and task arithmetic, LoRA adapters merge as the mean of their updates s·B@A (into the base, or as
a rank-R adapter), and every output reloads with plain transformers / PEFT and runs in `vlmalign eval`
and `vlmalign generate`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlmalign.cli.main import main

pytest.importorskip("mergekit")
P = "base_model.model."


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from vlmalign.models import load_adapter, save_tiny
    root = tmp_path_factory.mktemp("merge")
    for i in range(3):
        save_tiny("llava", str(root / f"m{i}"), seed=i)
    for i, r in enumerate((2, 4)):   # two adapters of m0, of different ranks, with the projector trained in full
        ad = load_adapter(str(root / "m0"))
        model = get_peft_model(ad.model, LoraConfig(r=r, lora_alpha=8, target_modules=ad.lora_target_modules(),
                                                    modules_to_save=["model.multi_modal_projector"]))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n or "modules_to_save" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.save_pretrained(str(root / f"a{i}"))
        ad.processor.save_pretrained(str(root / f"a{i}"))
    mme = root / "MME" / "existence"   # an MME subtask: 2 yes/no questions per image
    mme.mkdir(parents=True)
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (16, 16), colour).save(mme / f"{name}.png")
        (mme / f"{name}.txt").write_text("Is there a dog? Please answer yes or no.\tYes\n"
                                         "Is there a cat? Please answer yes or no.\tNo\n")
    prompts = [{"id": "p0", "image": "MME/existence/a.png",
                "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}]}]
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


def _params(path):
    from transformers import AutoModelForImageTextToText
    return {k: v.detach().clone() for k, v in AutoModelForImageTextToText.from_pretrained(str(path)).state_dict().items()}


def _runs(world, model, tmp_path, capsys):
    """`vlmalign eval` and `vlmalign generate` load ``model`` and answer."""
    assert main(["eval", "--task", "mme", "--data", str(world / "MME"), "--model", str(model), "--out",
                 str(tmp_path / "eval"), "--max-new-tokens", "2"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert main(["generate", "--model", str(model), "--data", str(world / "prompts.json"), "--out",
                 str(tmp_path / "gen.jsonl"), "--max-new-tokens", "3"]) == 0, capsys.readouterr().err
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 1


def test_full_mean_reloads_with_transformers_and_runs(world, tmp_path, capsys):
    out = tmp_path / "mean"
    assert main(["merge", "--method", "mean", str(world / "m0"), str(world / "m1"), "--out", str(out)]) == 0
    assert "merged 2 checkpoints with mean (mergekit linear)" in capsys.readouterr().out
    got, a, b = _params(out), _params(world / "m0"), _params(world / "m1")
    assert got.keys() == a.keys()
    for k in got:
        assert torch.allclose(got[k], (a[k] + b[k]) / 2, atol=1e-6), k
    assert (out / "tokenizer.json").read_text() == (world / "m0" / "tokenizer.json").read_text()
    _runs(world, out, tmp_path, capsys)


def test_full_task_arithmetic_is_base_plus_weighted_differences(world, tmp_path):
    out = tmp_path / "ta"
    assert main(["merge", "--method", "task-arithmetic", str(world / "m1"), str(world / "m2"), "--base",
                 str(world / "m0"), "--weights", "0.5,0.25", "--out", str(out)]) == 0
    got, base, x, y = _params(out), _params(world / "m0"), _params(world / "m1"), _params(world / "m2")
    for k in got:
        assert torch.allclose(got[k], base[k] + 0.5 * (x[k] - base[k]) + 0.25 * (y[k] - base[k]), atol=1e-5), k


def _hand_updates(world):
    """mean_i s_i·B_i@A_i per module, and the mean of the projector tensors, read from the files."""
    deltas, full = {}, {}
    for i in (0, 1):
        cfg = json.loads((world / f"a{i}" / "adapter_config.json").read_text())
        s = cfg["lora_alpha"] / cfg["r"]
        t = load_file(str(world / f"a{i}" / "adapter_model.safetensors"))
        for k, v in t.items():
            name = k[len(P):]
            if name.endswith(".lora_A.weight"):
                m = name[:-len(".lora_A.weight")]
                d = s * t[f"{P}{m}.lora_B.weight"] @ v / 2
                deltas[m] = deltas.get(m, 0) + d
            elif "lora_" not in name:
                full[name] = full.get(name, 0) + v / 2
    return deltas, full


def test_lora_merged_is_the_base_plus_the_mean_of_the_updates(world, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(["merge", "--method", "mean", str(world / "a0"), str(world / "a1"), "--out", str(out)]) == 0
    assert "ranks 2, 4: their updates were merged" in capsys.readouterr().out
    got, base = _params(out), _params(world / "m0")
    deltas, full = _hand_updates(world)
    assert len(deltas) == 14 and len(full) == 4
    for m, d in deltas.items():
        assert torch.allclose(got[m + ".weight"], base[m + ".weight"] + d, atol=1e-6), m
    for name, t in full.items():
        assert torch.allclose(got[name], t, atol=1e-6), name
    touched = {m + ".weight" for m in deltas} | set(full)
    assert all(torch.equal(got[k], base[k]) for k in got if k not in touched)
    _runs(world, out, tmp_path, capsys)


def test_lora_rank_r_adapter_loads_with_peft_and_equals_the_merge_at_full_rank(world, tmp_path, capsys):
    from vlmalign.models.peft import load_with_adapter
    out = tmp_path / "r6"
    assert main(["merge", "--method", "mean", str(world / "a0"), str(world / "a1"), "--lora-out", "rank:6",
                 "--out", str(out)]) == 0
    said = capsys.readouterr().out
    err = json.loads((out / "vlmalign_merge.json").read_text())["relative_error"]
    assert "rank 6 refactorisation: relative Frobenius error" in said and err < 1e-5   # 2 + 4 >= the true rank
    peft_model, _ = load_with_adapter(str(out))
    got = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    deltas, full = _hand_updates(world)
    base = _params(world / "m0")
    for m, d in deltas.items():
        assert torch.allclose(got[m + ".weight"], base[m + ".weight"] + d, atol=1e-5), m
    for name, t in full.items():
        assert torch.allclose(got[name], t, atol=1e-6), name
    assert main(["merge", "--method", "mean", str(world / "a0"), str(world / "a1"), "--lora-out", "rank:1",
                 "--out", str(tmp_path / "r1")]) == 0
    assert json.loads((tmp_path / "r1" / "vlmalign_merge.json").read_text())["relative_error"] > 0.1
    _runs(world, out, tmp_path, capsys)


def test_the_cli_refuses_bad_merges_with_the_reason(world, tmp_path, capsys):
    ins = [str(world / "m0"), str(world / "m1")]
    cases = [
        (["--method", "slerp", *ins, str(world / "m2"), "--out", str(tmp_path / "o")], "exactly 2 inputs, got 3"),
        (["--method", "weighted", *ins, "--weights", "1,2,3", "--out", str(tmp_path / "o")],
         "--weights has 3 values for 2 inputs"),
        (["--method", "mean", *ins, "--out", str(world / "m0" / "sub")], "would overwrite the input"),
        (["--method", "mean", *ins, "--out", str(world)], "would overwrite the input"),
        (["--method", "mean", str(world / "a0"), str(world / "m1"), "--out", str(tmp_path / "o")],
         "is a LoRA adapter and"),
        (["--method", "mean", str(world / "a0"), str(world / "a1"), "--out", str(world / "m0"), "--overwrite"],
         "would overwrite the input"),   # the adapters' base is read too
    ]
    for argv, says in cases:
        assert main(["merge", *argv]) == 2
        assert says in capsys.readouterr().err, argv
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["merge", "--method", "mean", *ins, "--out", str(tmp_path / "full")]) == 2
    assert "exists: choose another directory, or pass --overwrite" in capsys.readouterr().err
    assert main(["merge", "--method", "mean", *ins, "--out", str(tmp_path / "full"), "--overwrite"]) == 0
    assert not (tmp_path / "full" / "x").exists() and (tmp_path / "full" / "model.safetensors").exists()
