"""A run is never lost or silently wrong: signals save and say how to resume, an earlier run's
directory is refused, numbers outside their range are refused, a full disk says so, a failing
evaluation keeps the weights, and the plots show only what are curves."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmalign.config import ConfigError, load_config
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.engine.checkpoint import CheckpointWriteError
from vlmalign.engine.interrupt import TrainingInterrupted
from vlmalign.errors import DataError, ModelError, VlmalignError
from vlmalign.methods.sft import SFTConfig, SFTMethod, train_sft
from vlmalign.models import save_tiny


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    generate_shapesworld(root / "data", ShapesConfig(seed=2, train_images=24, eval_images=4))
    save_tiny("llava", str(root / "model"))
    return root


def _cfg(world, out, *extra):
    return load_config(SFTConfig, None, [
        f"model.path={world / 'model'}", f"data.train_file={world / 'data' / 'vqa_train.json'}",
        "data.max_length=256", f"train.output_dir={out}", "train.max_steps=5", "train.batch_size=4",
        "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant", *extra])


def _weights(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step}" / "model" / "model.safetensors"))


def _signal_at(monkeypatch, calls_to_signal: dict[int, int]):
    """Make SFT's loss send this process a signal on the given micro-batch calls."""
    real = SFTMethod.compute_loss
    n = {"calls": 0}

    def signalling(self, batch, num_items):
        n["calls"] += 1
        if n["calls"] in calls_to_signal:
            os.kill(os.getpid(), calls_to_signal[n["calls"]])
        return real(self, batch, num_items)

    monkeypatch.setattr(SFTMethod, "compute_loss", signalling)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_saves_and_resumes_to_the_same_weights(world, tmp_path, monkeypatch, sig, code):
    full = tmp_path / "full"
    train_sft(_cfg(world, full))
    run = tmp_path / "stopped"
    _signal_at(monkeypatch, {2: sig})
    before = _handlers()
    with pytest.raises(TrainingInterrupted) as ei:
        train_sft(_cfg(world, run))
    msg = str(ei.value)
    assert ei.value.exit_code == code
    assert f"stopped by {signal.Signals(sig).name} after step 2 of 5" in msg and "train.resume=true" in msg
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert _handlers() == before   # the engine put back the handlers it found
    monkeypatch.undo()
    result, _ = train_sft(_cfg(world, run, "train.resume=true"))
    assert result.step == 5
    wa, wb = _weights(full, 5), _weights(run, 5)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def _handlers():
    """The SIGINT and SIGTERM handlers now. (Compared with what the run found rather than with
    Python's defaults: an earlier test in the process may have left its own, e.g. transformers'
    Trainer installs a SIGTERM handler for its just-in-time checkpoints.)"""
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_a_second_signal_abandons_the_step_without_saving(world, tmp_path, monkeypatch):
    run = tmp_path / "twice"
    _signal_at(monkeypatch, {3: signal.SIGINT, 4: signal.SIGINT})
    with pytest.raises(TrainingInterrupted, match=r"second SIGINT during step 2.*nothing new was saved.*"
                                                  r"last checkpoint: none written yet"):
        train_sft(_cfg(world, run, "train.batch_size=2", "train.grad_accum=2"))
    assert not any(p.name.startswith("step-") for p in (run / "checkpoints").iterdir())


def test_an_earlier_run_directory_is_refused_unless_resume_or_overwrite(world, tmp_path):
    run = tmp_path / "run"
    train_sft(_cfg(world, run, "train.max_steps=2"))
    with pytest.raises(VlmalignError, match=r"already holds a run.*train.resume=true.*train.overwrite=true"):
        train_sft(_cfg(world, run, "train.max_steps=2"))
    with pytest.raises(VlmalignError, match="contradict"):
        train_sft(_cfg(world, run, "train.resume=true", "train.overwrite=true"))
    stale = run / "eval" / "step-3" / "vqa" / "predictions.jsonl"   # an earlier run's eval.tasks answers
    stale.parent.mkdir(parents=True)
    stale.write_text('{"id": "0", "prediction": "old"}\n')
    result, _ = train_sft(_cfg(world, run, "train.max_steps=3", "train.overwrite=true"))
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and result.step == 3  # the old run's metrics are gone, not appended to
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3"]
    assert not (run / "eval").exists()   # and its evals, which a new eval.tasks run would have resumed


def test_resuming_with_another_batch_size_is_refused(world, tmp_path):
    run = tmp_path / "run"
    train_sft(_cfg(world, run, "train.max_steps=2"))
    with pytest.raises(VlmalignError, match=r"cannot resume .*train.batch_size: 4 in the checkpoint, 2 now"):
        train_sft(_cfg(world, run, "train.max_steps=4", "train.resume=true", "train.batch_size=2"))


@pytest.mark.parametrize("override, text", [
    ("train.max_steps=-5", "train.max_steps: -5 is out of range (must be >= 0)"),
    ("train.epochs=-1", "train.epochs: -1.0 is out of range (must be > 0)"),
    ("train.batch_size=0", "train.batch_size: 0 is out of range (must be >= 1)"),
    ("train.grad_accum=0", "train.grad_accum: 0 is out of range"),
    ("optim.lr=-1", "optim.lr: -1.0 is out of range (must be > 0)"),
    ("lora.r=0", "lora.r: 0 is out of range (must be >= 1)"),
    ("data.max_train_samples=0", "data.max_train_samples: 0 is out of range (must be >= 1)"),
    ("data.max_train_samples=-1", "data.max_train_samples: -1 is out of range"),
    ("eval.max_samples=0", "eval.max_samples: 0 is out of range"),
    ("optim.betas=[0.9,1.5]", "optim.betas[1]: 1.5 is out of range"),
])
def test_numbers_out_of_range_are_refused_where_declared(override, text):
    with pytest.raises(ConfigError) as ei:
        load_config(SFTConfig, None, [override])
    assert text in str(ei.value)


def test_a_config_built_in_python_is_checked_too(world, tmp_path):
    cfg = _cfg(world, tmp_path / "run")
    cfg.train.batch_size = 0
    with pytest.raises(ConfigError, match="train.batch_size: 0 is out of range"):
        train_sft(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_record_limit_below_one_is_refused(world):
    from vlmalign.data.loading import read_records
    cfg = SFTConfig()
    with pytest.raises(VlmalignError, match="limit must be at least 1"):
        read_records(str(world / "data" / "vqa_train.json"), cfg.data, kind="conversation", limit=0)
    recs, _ = read_records(str(world / "data" / "vqa_train.json"), cfg.data, kind="conversation", limit=3)
    assert len(recs) == 3


def test_lora_targets_that_match_nothing_are_refused(world, tmp_path):
    cfg = _cfg(world, tmp_path / "run", "lora.enabled=true", "lora.targets=[q_projj]")
    with pytest.raises(ModelError, match=r"lora.targets: q_projj match no Linear layer.*q_proj"):
        train_sft(cfg)


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
                                   OSError(28, "No space left on device")])
def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch, error):
    run = tmp_path / "run"
    real = torch.save
    n = {"saves": 0}

    def failing(obj, f, *a, **k):
        n["saves"] += 1
        if n["saves"] == 2:
            raise error
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint step-2 .*MiB free\): the disk is full;"
                                                   r" the partial copy was removed and the previous checkpoint "
                                                   r".*step-1 is kept"):
        train_sft(_cfg(world, run, "train.save_every=1", "train.max_steps=3"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]


def test_a_missing_image_in_an_eval_file_stops_before_training(world, tmp_path):
    data = json.loads((world / "data" / "vqa_eval.json").read_text())[:4]
    data[1]["image"] = "images/missing.png"
    f = world / "data" / "vqa_eval_bad.json"
    f.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"vqa_eval_bad.json: record 1: .*image file not found") as ei:
        train_sft(_cfg(world, tmp_path / "run", f"eval.vqa_file={f}"))
    assert ei.value.index == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_failing_final_evaluation_keeps_the_trained_weights(world, tmp_path, monkeypatch):
    import vlmalign.eval.vqa as vqa

    def broken(*a, **k):
        raise RuntimeError("the scorer broke")

    monkeypatch.setattr(vqa, "evaluate_vqa", broken)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the scorer broke"):
        train_sft(_cfg(world, run, f"eval.vqa_file={world / 'data' / 'vqa_eval.json'}", "train.max_steps=2"))
    assert (run / "checkpoints" / "step-2" / "model" / "model.safetensors").exists()


def test_the_plot_has_curves_and_the_report_the_single_values(world, tmp_path):
    run = tmp_path / "run"
    train_sft(_cfg(world, run, f"data.eval_file={world / 'data' / 'vqa_eval.json'}", "optim.schedule=linear"))
    from vlmalign.engine.run_dir import RunDir
    rd = RunDir(run)
    series = rd.series()
    assert "lr" in series and rd.is_curve(series["lr"])             # the schedule is plotted
    assert len(series["eval/loss"]) == 1 and not rd.is_curve(series["eval/loss"])
    report = (run / "report.md").read_text()
    assert "| eval/loss |" in report and "training.png" in report
    curves = report.split("Curves: ", 1)[1].split(".\n", 1)[0].split(", ")
    assert "train/loss" in curves and "lr" in curves and "eval/loss" not in curves


@pytest.mark.parametrize("name, content", [("empty.json", "[]"), ("empty.jsonl", "")])
def test_an_empty_training_file_is_refused_by_name(world, tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(VlmalignError) as ei:
        train_sft(_cfg(world, tmp_path / "run", f"data.train_file={f}"))
    assert str(f) in str(ei.value)


def test_the_training_config_sets_the_pixel_budget_and_skip_skips_what_exceeds_it(world, tmp_path, caplog):
    recs = json.loads((world / "data" / "vqa_train.json").read_text())[:6]
    from PIL import Image
    Image.new("RGB", (300, 300), "red").save(world / "data" / "big.png")
    recs[2]["image"] = "big.png"
    f = world / "data" / "with_big.json"
    f.write_text(json.dumps(recs))
    small = max(Image.open(world / "data" / r["image"]).width ** 2 for r in recs if r["image"] != "big.png")
    with pytest.raises(DataError, match=r"with_big.json.*record 2.*pixel budget"):
        train_sft(_cfg(world, tmp_path / "run", f"data.train_file={f}", f"data.max_pixels={small}"))
    result, _ = train_sft(_cfg(world, tmp_path / "run2", f"data.train_file={f}", f"data.max_pixels={small}",
                               "data.on_error=skip", "train.max_steps=1"))
    assert "skipped 1 of 6" in caplog.text


@pytest.mark.parametrize("name,says", [("ranked_train.json", "ranked records read as conversation: trains on "
                                                              "each list's best response (the first) only"),
                                       ("dpo_train.json", "preference records read as conversation: trains on "
                                                          "each pair's chosen response only")])
def test_sft_on_ranked_or_paired_data_says_what_it_leaves_out(world, tmp_path, caplog, name, says):
    f = world / "data" / name
    n = len(json.loads(f.read_text()))
    with caplog.at_level("WARNING", logger="vlmalign"):
        train_sft(_cfg(world, tmp_path / "run", f"data.train_file={f}", "train.max_steps=1"))
    assert f"{f}: {n} {says}" in caplog.text


def test_a_model_trained_with_images_after_the_question_says_so(tmp_path):
    generate_shapesworld(tmp_path / "data", ShapesConfig(seed=4, train_images=6, eval_images=2,
                                                         image_position="after", max_turns=1))
    save_tiny("llava", str(tmp_path / "model"))
    cfg = load_config(SFTConfig, None, [
        f"model.path={tmp_path / 'model'}", f"data.train_file={tmp_path / 'data' / 'vqa_train.json'}",
        "data.max_length=256", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.batch_size=2",
        "train.progress=false"])
    train_sft(cfg)
    n = len(json.loads((tmp_path / "data" / "vqa_train.json").read_text()))
    layout = json.loads((tmp_path / "run" / "checkpoints" / "step-1" / "model" / "vlmalign_prompt.json").read_text())
    assert layout == {"image_position": "after", "counts": {"before": 0, "after": n, "inside": 0}}


def test_sigterm_to_the_cli_saves_and_exits_143_with_how_to_resume(world, tmp_path):
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlmalign", "train", "sft", f"model.path={world / 'model'}",
           f"data.train_file={world / 'data' / 'vqa_train.json'}", "data.max_length=256", "train.max_steps=10000",
           "train.batch_size=2", f"train.output_dir={run}", "optim.lr=1e-3"]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    assert "error: stopped by SIGTERM after step" in err and "train.resume=true" in err
    steps = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert len(steps) == 1
    # not a terminal: no progress bar redrawn into the log
    assert "\r" not in err and "it/s]" not in err
