"""Full checkpoints merge tensor by tensor: results against hand-computed means, weighted means and
task arithmetic; every refusal names the file and tensor; the output is written atomically, in shards
past a size. Checkpoints are written by hand (a config.json and safetensors, no model)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmalign.merge import MergeError, MergeSpec, merge
from vlmalign.merge.methods import resolve
from vlmalign.merge.store import ShardWriter, TensorFiles

pytest.importorskip("mergekit")


def ckpt(path, tensors, model_type="toy", **extra_files):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["Toy"]}))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    for name, text in extra_files.items():
        (path / name).write_text(text)
    return str(path)


def three(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).to(torch.bfloat16),
           "idx": torch.arange(4)} for _ in range(3)]
    paths = [ckpt(tmp_path / f"m{i}", t, **({"tokenizer.json": "{}"} if i == 0 else {})) for i, t in enumerate(ts)]
    return paths, ts


def test_mean_weighted_and_task_arithmetic_match_the_hand_computed_values(tmp_path):
    paths, ts = three(tmp_path)
    merge(paths, str(tmp_path / "mean"), MergeSpec("mean"))
    out = load_file(str(tmp_path / "mean" / "model.safetensors"))
    assert torch.allclose(out["w"], (ts[0]["w"] + ts[1]["w"] + ts[2]["w"]) / 3, atol=1e-6)
    assert out["b"].dtype == torch.bfloat16 and torch.equal(out["idx"], torch.arange(4))
    assert (tmp_path / "mean" / "tokenizer.json").exists() and (tmp_path / "mean" / "config.json").exists()
    merge(paths[:2], str(tmp_path / "wt"), MergeSpec("weighted", weights=(1, 3)))
    out = load_file(str(tmp_path / "wt" / "model.safetensors"))
    assert torch.allclose(out["w"], (ts[0]["w"] + 3 * ts[1]["w"]) / 4, atol=1e-6)
    base = paths[0]
    merge(paths[1:], str(tmp_path / "ta"), MergeSpec("task-arithmetic", weights=(0.5, 0.25)), base=base)
    out = load_file(str(tmp_path / "ta" / "model.safetensors"))
    b = ts[0]["w"]
    assert torch.allclose(out["w"], b + 0.5 * (ts[1]["w"] - b) + 0.25 * (ts[2]["w"] - b), atol=1e-6)


def test_slerp_ends_at_its_inputs_and_dare_repeats_with_its_seed(tmp_path):
    paths, ts = three(tmp_path)
    for t, want in ((0.0, ts[0]["w"]), (1.0, ts[1]["w"])):
        merge(paths[:2], str(tmp_path / f"s{t}"), MergeSpec("slerp", t=t))
        assert torch.allclose(load_file(str(tmp_path / f"s{t}" / "model.safetensors"))["w"], want, atol=1e-5)
    outs = []
    for name, seed in (("d1", 3), ("d2", 3), ("d3", 4)):
        merge(paths[1:], str(tmp_path / name), MergeSpec("dare", density=0.5, seed=seed), base=paths[0])
        outs.append(load_file(str(tmp_path / name / "model.safetensors"))["w"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    merge(paths[1:], str(tmp_path / "ties"), MergeSpec("ties", density=1.0), base=paths[0])


@pytest.mark.parametrize("change,says", [
    (lambda t: t.pop("w"), r"m1: tensor w of .*m0/model.safetensors is missing"),
    (lambda t: t.update(extra=torch.zeros(1)), r"m1/model.safetensors: tensor extra is not in .*m0"),
    (lambda t: t.update(w=torch.zeros(4, 3)), r"m1/model.safetensors: tensor w has shape \[4, 3\], but \[3, 4\]"),
    (lambda t: t.update(idx=torch.arange(4) + 1), r"m1/model.safetensors: tensor idx \(torch.int64\) differs"),
])
def test_checkpoints_that_do_not_match_are_refused_by_file_and_tensor(tmp_path, change, says):
    ok = {"w": torch.ones(3, 4), "idx": torch.arange(4)}
    bad = dict(ok)
    change(bad)
    paths = [ckpt(tmp_path / "m0", ok), ckpt(tmp_path / "m1", bad)]
    with pytest.raises(MergeError, match=says):
        merge(paths, str(tmp_path / "out"), MergeSpec("mean"))
    assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp-out").exists()


def test_another_architecture_or_no_weights_is_refused(tmp_path):
    a = ckpt(tmp_path / "a", {"w": torch.ones(2)})
    b = ckpt(tmp_path / "b", {"w": torch.ones(2)}, model_type="other")
    with pytest.raises(MergeError, match=r"b/config.json: model_type 'other' differs from .*a/config.json's 'toy'"):
        merge([a, b], str(tmp_path / "out"), MergeSpec("mean"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"model_type": "toy", "architectures": ["Toy"]}))
    with pytest.raises(MergeError, match=r"c: no .safetensors weights"):
        merge([a, str(tmp_path / "c")], str(tmp_path / "out"), MergeSpec("mean"))
    with pytest.raises(MergeError, match="no such model or adapter directory"):
        merge([a, str(tmp_path / "nope")], str(tmp_path / "out"), MergeSpec("mean"))


@pytest.mark.parametrize("spec,n,says", [
    (MergeSpec("slerp"), 3, "exactly 2 inputs, got 3"),
    (MergeSpec("weighted", weights=(1, 2, 3)), 2, "--weights has 3 values for 2 inputs"),
    (MergeSpec("task-arithmetic", weights=(1,)), 2, r"--weights has 1 values for 2 inputs: .*the base has none"),
    (MergeSpec("weighted"), 2, "needs --weights"),
    (MergeSpec("weighted", weights=(1, -1)), 2, "weights >= 0 with a positive sum"),
    (MergeSpec("mean", weights=(1, 1)), 2, "use --method weighted"),
    (MergeSpec("mean", density=0.3), 2, "--density is for"),
    (MergeSpec("ties", density=0), 2, r"--density 0 is out of range"),
    (MergeSpec("slerp", t=2), 2, r"--t 2 is out of range"),
    (MergeSpec("mean", t=0.5), 2, "--t is for slerp"),
    (MergeSpec("slerp", weights=(1, 1)), 2, "not used by slerp"),
    (MergeSpec("mean"), 1, "needs at least 2 inputs"),
    (MergeSpec("avg"), 2, "unknown merge method"),
])
def test_options_that_do_not_fit_the_method_are_refused(spec, n, says):
    with pytest.raises(MergeError, match=says):
        resolve(spec, n)


def test_task_methods_need_a_base_and_the_others_take_none(tmp_path):
    paths, _ = three(tmp_path)
    with pytest.raises(MergeError, match="--method ties merges differences from a base: pass --base"):
        merge(paths, str(tmp_path / "out"), MergeSpec("ties"))
    with pytest.raises(MergeError, match="--method mean uses none"):
        merge(paths, str(tmp_path / "out"), MergeSpec("mean"), base=paths[0])
    with pytest.raises(MergeError, match="--lora-out is for merging LoRA adapters"):
        merge(paths, str(tmp_path / "out"), MergeSpec("mean"), lora_out="rank:2")


def test_large_outputs_are_sharded_with_an_index_and_read_back(tmp_path):
    w = ShardWriter(tmp_path, max_bytes=100)
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}   # 40 bytes each: 2 per shard
    for k, v in tensors.items():
        w.add(k, v)
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    back = TensorFiles(tmp_path)
    assert sorted(back.keys()) == sorted(tensors) and all(torch.equal(back.get(k), v) for k, v in tensors.items())
