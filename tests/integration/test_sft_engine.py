"""SFT through the engine on a tiny LLaVA: learning, freezing, checkpoints, resume, accumulation,
non-finite losses, bad data, and two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmalign.config import load_config
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.engine.trainer import NonFiniteLossError
from vlmalign.errors import DataError
from vlmalign.methods.sft import SFTConfig, SFTMethod, PretrainConfig, train_sft
from vlmalign.models import save_tiny
from ports import free_port


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    generate_shapesworld(root / "data", ShapesConfig(seed=1, train_images=24, eval_images=4))
    save_tiny("llava", str(root / "model"))
    return root


def _cfg(world, out, *extra, base=None):
    return load_config(SFTConfig, None, [
        f"model.path={world / 'model'}", f"data.train_file={world / 'data' / 'vqa_train.json'}",
        "data.max_length=256", f"train.output_dir={out}", "train.max_steps=4", "train.batch_size=4",
        "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant", *extra],
        base=base)


def _weights(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step-{step}" / "model" / "model.safetensors"))


def test_sft_trains_what_is_trainable_and_reloads(world, tmp_path):
    cfg = _cfg(world, tmp_path / "run", "model.train_vision=false")
    from vlmalign.models import load_adapter
    before = {k: v.clone() for k, v in load_adapter(str(world / "model")).model.state_dict().items()}
    result, adapter = train_sft(cfg)
    assert result.step == 4
    after = adapter.model.state_dict()
    groups = adapter.param_groups()
    for name, p in groups["vision"]:
        assert torch.equal(after[name], before[name]), f"frozen {name} changed"
    for g in ("projector", "language", "head"):
        for name, p in groups[g]:
            assert not torch.equal(after[name], before[name]), f"trainable {name} did not move"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert (tmp_path / "run" / "training.png").stat().st_size > 1000
    assert (tmp_path / "run" / "config.yaml").exists()
    # the checkpoint is a normal model directory that reloads to the same weights
    reloaded = load_adapter(str(tmp_path / "run" / "checkpoints" / "step-4" / "model"))
    for k, v in reloaded.model.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_pretrain_moves_only_the_projector(world, tmp_path):
    cfg = _cfg(world, tmp_path / "pre", "train.max_steps=2",
               f"data.train_file={world / 'data' / 'captions_train.json'}", base=PretrainConfig())
    from vlmalign.models import load_adapter
    before = load_adapter(str(world / "model")).model.state_dict()
    _, adapter = train_sft(cfg)
    after = adapter.model.state_dict()
    for g, params in adapter.param_groups().items():
        for name, _ in params:
            moved = not torch.equal(after[name], before[name])
            assert moved == (g == "projector"), (g, name)


def test_gradient_accumulation_equals_big_batch(world, tmp_path):
    a, _ = train_sft(_cfg(world, tmp_path / "a", "train.max_steps=2", "train.batch_size=4"))
    b, _ = train_sft(_cfg(world, tmp_path / "b", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=2"))
    wa, wb = _weights(tmp_path / "a", 2), _weights(tmp_path / "b", 2)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    assert abs(a.metrics["loss"] - b.metrics["loss"]) < 1e-6


def test_non_finite_loss_stops_and_keeps_last_checkpoint(world, tmp_path, monkeypatch):
    real = SFTMethod.compute_loss
    calls = {"n": 0}

    def poisoned(self, batch, num_items):
        calls["n"] += 1
        loss, m = real(self, batch, num_items)
        return (loss * float("nan"), m) if calls["n"] == 3 else (loss, m)

    monkeypatch.setattr(SFTMethod, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3.*step-2"):
        train_sft(_cfg(world, tmp_path / "nan", "train.save_every=1", "train.keep_last=5"))
    ck = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert ck == ["step-1", "step-2"]
    w = _weights(tmp_path / "nan", 2)
    assert all(torch.isfinite(v).all() for v in w.values())


def test_bad_record_is_refused_with_location_or_skipped_and_counted(world, tmp_path):
    data = json.loads((world / "data" / "vqa_train.json").read_text())[:6]
    data[2]["image"] = "images/missing.png"
    f = world / "data" / "bad_train.json"
    f.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"bad_train.json: record 2: .*image file not found"):
        train_sft(_cfg(world, tmp_path / "bad", f"data.train_file={f}"))
    from vlmalign.data.loading import load_examples
    from vlmalign.models import load_adapter
    ad = load_adapter(str(world / "model"))
    cfg = _cfg(world, tmp_path / "bad2", f"data.train_file={f}", "data.on_error=skip")
    ex, _, rep = load_examples(str(f), cfg.data, ad, lambda r, i: {"input_ids": ad.tokenize_record(r, i).input_ids},
                               kind="conversation")
    assert len(ex) == 5 and rep.count == 1 and rep.total == 6
    assert "record 2" in rep.summary()


def _cli(*args, env=None):
    return [sys.executable, "-m", "vlmalign", *args]


def test_resume_after_sigkill_matches_uninterrupted_run(world, tmp_path):
    common = ["train", "sft", f"model.path={world / 'model'}",
              f"data.train_file={world / 'data' / 'vqa_train.json'}", "data.max_length=256",
              "train.max_steps=6", "train.batch_size=4", "train.save_every=1", "train.keep_last=10",
              "train.progress=false", "optim.lr=1e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    full = tmp_path / "full"
    subprocess.run(_cli(*common, f"train.output_dir={full}"), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, f"train.output_dir={killed}"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-3").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert "step-6" not in done
    subprocess.run(_cli(*common, f"train.output_dir={killed}", "train.resume=true"), check=True, env=env,
                   capture_output=True)
    wa, wb = _weights(full, 6), _weights(killed, 6)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-6, k
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # no duplicated steps after resume


@pytest.mark.slow
def test_two_processes_match_one(world, tmp_path):
    common = ["train", "sft", f"model.path={world / 'model'}",
              f"data.train_file={world / 'data' / 'vqa_train.json'}", "data.max_length=256",
              "train.max_steps=3", "train.progress=false", "optim.lr=1e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run(_cli(*common, "train.batch_size=4", f"train.output_dir={one}"), check=True, env=env,
                   capture_output=True)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "vlmalign", *common, "train.batch_size=2", f"train.output_dir={two}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    la = [json.loads(x)["train/loss"] for x in (one / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    lb = [json.loads(x)["train/loss"] for x in (two / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert len(la) == len(lb) == 3
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (la, lb)
    wa, wb = _weights(one, 3), _weights(two, 3)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
