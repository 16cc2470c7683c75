"""LoRA adapters merge as weight updates ΔW = s·B@A, never as separate means of A and B; the rank-R
refactorisation by truncated SVD and its reported error. Adapters are written by hand (no model)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vlmalign.merge import MergeError, MergeSpec, merge, merge_adapters
from vlmalign.merge.adapters import read_adapter
from vlmalign.merge.lora import factorise, merge_updates, parse_lora_out
from vlmalign.merge.methods import resolve

pytest.importorskip("mergekit")
P = "base_model.model."


def adapter(path, modules, *, r, alpha, base="some/base", full=None, **cfg):
    """An adapter directory: ``modules`` {name: (A, B)}, ``full`` {name: tensor} (modules_to_save)."""
    path.mkdir(parents=True)
    tensors = {}
    for m, (a, b) in modules.items():
        tensors[f"{P}{m}.lora_A.weight"], tensors[f"{P}{m}.lora_B.weight"] = a.clone(), b.clone()
    tensors.update({P + n: t for n, t in (full or {}).items()})
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "base_model_name_or_path": base, "bias": "none",
        "target_modules": sorted(modules), "rank_pattern": {}, "alpha_pattern": {}, **cfg}))
    return path


# two rank-1 updates whose factor means multiply to something else than their mean:
# B1@A1 = [[1,0],[0,0]], B2@A2 = [[0,0],[0,1]]; mean = I/2, but mean(B)@mean(A) = [[1,1],[1,1]]/4
A1, B1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
A2, B2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])


def test_the_mean_of_updates_is_not_the_product_of_the_factor_means(tmp_path):
    ads = [read_adapter(adapter(tmp_path / "a", {"lin": (A1, B1)}, r=1, alpha=2)),
           read_adapter(adapter(tmp_path / "b", {"lin": (A2, B2)}, r=1, alpha=2))]
    merged = merge_updates(resolve(MergeSpec("mean"), 2), ads)["lin"]
    scaling = 2 / 1
    assert torch.allclose(merged, scaling * torch.eye(2) / 2)                       # mean(s·B@A)
    factor_means = scaling * ((B1 + B2) / 2) @ ((A1 + A2) / 2)
    assert torch.allclose(factor_means, scaling * torch.full((2, 2), 0.25))
    assert not torch.allclose(merged, factor_means)                                 # the wrong way differs


def test_updates_of_different_ranks_and_scalings_average_as_updates(tmp_path):
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g)
    a2, b2 = torch.randn(4, 5, generator=g), torch.randn(3, 4, generator=g)
    ads = [read_adapter(adapter(tmp_path / "a", {"x.q": (a1, b1)}, r=2, alpha=8)),
           read_adapter(adapter(tmp_path / "b", {"x.q": (a2, b2)}, r=4, alpha=2, use_rslora=True))]
    want = [8 / 2 * b1 @ a1, 2 / 4 ** 0.5 * b2 @ a2]
    assert torch.allclose(merge_updates(resolve(MergeSpec("mean"), 2), ads)["x.q"], (want[0] + want[1]) / 2)
    weighted = merge_updates(resolve(MergeSpec("weighted", weights=(1, 3)), 2), ads)["x.q"]
    assert torch.allclose(weighted, (want[0] + 3 * want[1]) / 4, atol=1e-6)
    task = merge_updates(resolve(MergeSpec("task-arithmetic", weights=(0.5, 2)), 2), ads)["x.q"]
    assert torch.allclose(task, 0.5 * want[0] + 2 * want[1], atol=1e-6)


def test_rank_and_alpha_patterns_set_a_modules_scaling(tmp_path):
    a, b = torch.ones(2, 3), torch.ones(4, 2)
    ad = read_adapter(adapter(tmp_path / "a", {"m.layers.0.q_proj": (a, b), "m.layers.0.v_proj": (a[:1], b[:, :1])},
                              r=2, alpha=4, rank_pattern={"v_proj": 1}, alpha_pattern={"v_proj": 3}))
    assert ad.scaling("m.layers.0.q_proj") == 2.0 and ad.scaling("m.layers.0.v_proj") == 3.0


def test_truncated_svd_is_exact_at_the_true_rank_and_reports_its_error():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(6, 3, generator=g) @ torch.randn(3, 5, generator=g)     # rank 3
    for r in (3, 4, 8):
        a, b, err, norm = factorise(d, r)
        assert a.shape == (r, 5) and b.shape == (6, r)
        assert torch.allclose(b @ a, d, atol=1e-5) and err / norm < 1e-10
    a, b, err, norm = factorise(d, 1)
    assert err > 0 and abs(err - float(((d - b @ a) ** 2).sum())) < 1e-4 * norm


def test_rank_r_output_is_an_adapter_whose_update_is_the_mean(tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    mods = ["l0.q", "l1.q"]
    ins = []
    for i, r in enumerate((2, 3)):
        ins.append(adapter(tmp_path / f"in{i}", {m: (torch.randn(r, 5, generator=g), torch.randn(4, r, generator=g))
                                                 for m in mods}, r=r, alpha=4,
                           full={"proj.weight": torch.full((2, 2), float(i))}))
    want = merge_updates(resolve(MergeSpec("mean"), 2), [read_adapter(p) for p in ins])
    exact = merge_adapters([str(p) for p in ins], str(tmp_path / "r5"), MergeSpec("mean"), lora_out="rank:5")
    out = read_adapter(tmp_path / "r5")
    assert exact.relative_error < 1e-6 and out.config["r"] == 5 and out.config["lora_alpha"] == 5
    assert out.config["base_model_name_or_path"] == "some/base"
    for m in mods:
        assert torch.allclose(out.delta(m), want[m], atol=1e-5)
    assert torch.equal(out.full["proj.weight"], torch.full((2, 2), 0.5))
    low = merge_adapters([str(p) for p in ins], str(tmp_path / "r1"), MergeSpec("mean"), lora_out="rank:1")
    num = sum(float(((read_adapter(tmp_path / "r1").delta(m) - want[m]) ** 2).sum()) for m in mods)
    den = sum(float((want[m] ** 2).sum()) for m in mods)
    assert low.relative_error == pytest.approx((num / den) ** 0.5, rel=1e-4) and low.relative_error > 0.05
    record = json.loads((tmp_path / "r1" / "vlmalign_merge.json").read_text())
    assert record["relative_error"] == low.relative_error and record["spec"]["mergekit_method"] == "linear"


def test_lora_out_is_merged_or_rank_r():
    assert parse_lora_out("merged") is None and parse_lora_out("rank:16") == 16
    for bad in ("rank:0", "rank", "rank:x", "svd"):
        with pytest.raises(MergeError, match="--lora-out"):
            parse_lora_out(bad)


def _pair(tmp_path, second: dict, **cfg):
    a = adapter(tmp_path / "a", {"l.q": (A1, B1), "l.v": (A1, B1)}, r=1, alpha=1)
    b = adapter(tmp_path / "b", second, r=1, alpha=1, **cfg)
    return [str(a), str(b)]


@pytest.mark.parametrize("second,cfg,says", [
    ({"l.q": (A1, B1)}, {}, r"b/adapter_model.safetensors: its LoRA target modules differ .*module l.v is missing"),
    ({"l.q": (A1, B1), "l.k": (A1, B1)}, {}, r"module l.v is missing"),
    ({"l.q": (A1, B1), "l.v": (A1, B1)}, {"base_model_name_or_path": "other/base"},
     r"b/adapter_config.json: base model 'other/base' differs .*'some/base'"),
    ({"l.q": (A1, B1), "l.v": (torch.ones(1, 3), B1)}, {}, r"b/adapter_model.safetensors: l.v: update of shape \[2, 3\]"),
    ({"l.q": (A1, B1), "l.v": (A1, B1)}, {"use_dora": True}, r"b/adapter_config.json: use_dora is set"),
])
def test_adapters_that_cannot_be_merged_are_refused_by_file(tmp_path, second, cfg, says):
    with pytest.raises(MergeError, match=says):
        merge(_pair(tmp_path, second, **cfg), str(tmp_path / "out"), MergeSpec("mean"), lora_out="rank:2")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp-out").exists()


def test_an_adapter_is_not_merged_with_a_full_checkpoint(tmp_path):
    a = adapter(tmp_path / "a", {"l.q": (A1, B1)}, r=1, alpha=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(MergeError, match=r"a is a LoRA adapter and .*full is not"):
        merge([str(a), str(tmp_path / "full")], str(tmp_path / "out"), MergeSpec("mean"))


def _base_dir(path, value: float):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "toy"}')
    save_file({"w": torch.full((2,), value)}, str(path / "model.safetensors"))
    return str(path)


def test_two_copies_of_one_base_are_one_base_and_other_weights_are_not(tmp_path):
    b0, b1, b2 = _base_dir(tmp_path / "b0", 1.0), _base_dir(tmp_path / "b1", 1.0), _base_dir(tmp_path / "b2", 2.0)
    ins = [str(adapter(tmp_path / f"a{i}", {"l.q": (A1, B1)}, r=1, alpha=1, base=b)) for i, b in enumerate((b0, b1, b2))]
    merge(ins[:2], str(tmp_path / "same"), MergeSpec("mean"), lora_out="rank:1")
    with pytest.raises(MergeError, match=r"a2/adapter_config.json: base model .*b2' differs from .*b0'"
                                         r": adapters of different base models"):
        merge([ins[0], ins[2]], str(tmp_path / "other"), MergeSpec("mean"), lora_out="rank:1")


def test_base_names_that_cannot_be_compared_need_base(tmp_path):
    ins = _pair(tmp_path, {"l.q": (A1, B1), "l.v": (A1, B1)}, base_model_name_or_path="org/moved")
    with pytest.raises(MergeError, match=r"cannot be compared here: pass --base"):
        merge(ins, str(tmp_path / "out"), MergeSpec("mean"), lora_out="rank:1")
    report = merge(ins, str(tmp_path / "out"), MergeSpec("mean"), lora_out="rank:1", base="some/base")
    assert any("merged onto --base some/base as asked" in n for n in report.notes)
