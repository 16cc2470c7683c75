"""Keeps benchmarks/dpo_throughput.py (and sft_throughput.py, grpo_throughput.py) from rotting: its
whole code path (model and data build, one process per side, FLOP counting, vision-encode
counting, report) on the smallest preset with one warm-up and one timed step per side. Nothing here is timed: only counts and the report's
arithmetic are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "dpo_throughput.py"
KEYS = {"pairs_per_s", "vision_encodes_per_pair", "flops_per_pair", "peak_mem_mb"}


def _run(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, **kw)


def test_help_lists_the_options():
    proc = _run(["--help"])
    assert proc.returncode == 0, proc.stderr
    for opt in ("--json", "--preset", "--device", "--dtype", "--peak-tflops", "--lora", "--rounds"):
        assert opt in proc.stdout
    assert "llava-1.5-7b" in proc.stdout


def test_smoke_run_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    proc = _run(["--preset", "smoke", "--rounds", "1", "--warmup", "1", "--steps", "1", "--quiet",
                 "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rep = json.loads(out.read_text())
    ours, trl = rep["ours"], rep["trl"]
    assert KEYS <= set(ours) and KEYS <= set(trl)
    # TRL encodes each image for chosen and rejected, policy and reference; ours once per pair
    assert trl["vision_encodes_per_pair"] == 4.0
    assert ours["vision_encodes_per_pair"] == 1.0
    assert ours["adapter_encodes_per_pair"] == 1.0
    # our reference log-probs are precomputed: one encode per pair in that pass, reported apart
    assert ours["precompute_encodes_per_pair"] == 1.0
    assert ours["precompute_flops_per_pair"] > 0
    for side in (ours, trl):
        assert side["pairs_per_s"] > 0 and side["flops_per_pair"] > 0
        assert side["peak_mem_mb"] >= side["base_mem_mb"] > 0
    assert rep["speedup"] == pytest.approx(ours["pairs_per_s"] / trl["pairs_per_s"])
    assert rep["flops_ratio"] == pytest.approx(trl["flops_per_pair"] / ours["flops_per_pair"])
    # both sides trained the same parameters on the same token rows
    assert ours["trainable_params"] == trl["trainable_params"]
    assert trl["trl_mean_row_tokens"] == pytest.approx(rep["setup"]["seq"]["sequence_tokens"])
    assert "pairs/s, training steps" in proc.stdout


SFT_SCRIPT = ROOT / "benchmarks" / "sft_throughput.py"
SFT_KEYS = {"samples_per_s", "peak_mem_mb", "flops_per_sample", "token_slots_per_sample", "real_tokens_per_sample"}


def test_sft_smoke_run_writes_the_report(tmp_path):
    """benchmarks/sft_throughput.py: our SFT unpacked and packed and TRL's SFTTrainer, one step each."""
    out = tmp_path / "report.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(SFT_SCRIPT), "--preset", "smoke", "--rounds", "1", "--warmup", "1",
                           "--steps", "1", "--quiet", "--work-dir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rep = json.loads(out.read_text())
    ours, packed, trl = rep["ours"], rep["packed"], rep["trl"]
    for side in (ours, packed, trl):
        assert SFT_KEYS <= set(side)
        assert side["samples_per_s"] > 0 and side["flops_per_sample"] > 0
        assert side["peak_mem_mb"] >= side["base_mem_mb"] > 0
        assert side["vision_encodes_per_sample"] == 1.0
    # the same samples and tokens on every side; packing computes fewer token slots in fewer rows
    assert ours["real_tokens_per_sample"] == packed["real_tokens_per_sample"] == trl["real_tokens_per_sample"]
    assert ours["token_slots_per_sample"] == trl["token_slots_per_sample"]
    assert packed["rows_per_step"] < ours["rows_per_step"] == rep["setup"]["batch_size"]
    assert ours["trainable_params"] == packed["trainable_params"] == trl["trainable_params"]
    r = rep["ratios"]
    assert r["packed_vs_ours"]["samples_per_s"] == pytest.approx(packed["samples_per_s"] / ours["samples_per_s"])
    assert r["ours_vs_trl"]["peak_mem"] == pytest.approx(ours["peak_mem_mb"] / trl["peak_mem_mb"])
    # TRL 1.16 refuses packing and padding-free training for vision data; the report says so
    assert trl["trl_packing"]["packing"].startswith("refused")
    assert trl["trl_packing"]["padding_free"].startswith("refused")
    assert "samples/s, training steps" in proc.stdout


GRPO_SCRIPT = ROOT / "benchmarks" / "grpo_throughput.py"
GRPO_KEYS = {"samples_per_s", "vision_encodes_per_sample", "peak_mem_mb", "cpu_s_per_sample",
             "wall_s_per_sample_by_part", "cpu_s_per_sample_by_part"}


def test_grpo_smoke_run_writes_the_report(tmp_path):
    """benchmarks/grpo_throughput.py: our GRPO and TRL's GRPOTrainer, 2 prompts x 2 samples of 3
    tokens, one warm-up and one timed step each."""
    out = tmp_path / "report.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(GRPO_SCRIPT), "--preset", "smoke", "--rounds", "1", "--warmup", "1",
                           "--steps", "1", "--max-new-tokens", "3", "--quiet", "--work-dir", str(tmp_path / "work"),
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rep = json.loads(out.read_text())
    ours, trl = rep["ours"], rep["trl"]
    for side in (ours, trl):
        assert GRPO_KEYS <= set(side)
        assert side["samples_per_s"] > 0 and side["peak_mem_mb"] >= side["base_mem_mb"] > 0
        assert side["wall_s_per_sample_by_part"]["generate"] > 0 and side["cpu_s_per_sample_by_part"]["backward"] > 0
        # the completion length is fixed on both sides (each side checks every completion)
        assert side["completion_tokens"] == 3
    # TRL encodes every completion's image in generation and again in the training forward; ours
    # once per prompt group (k = 2)
    assert trl["vision_encodes_per_sample"] == 2.0
    assert ours["vision_encodes_per_sample"] == 0.5
    # the same prompts (tokens) and trainable parameters
    assert trl["prompt_tokens"] == pytest.approx(rep["setup"]["seq"]["prompt_tokens"])
    assert ours["trainable_params"] == trl["trainable_params"]
    r = rep["ratios"]
    assert r["samples_per_s"] == pytest.approx(ours["samples_per_s"] / trl["samples_per_s"])
    assert r["peak_mem"] == pytest.approx(ours["peak_mem_mb"] / trl["peak_mem_mb"])
    assert "samples/s" in proc.stdout and "vision encodes/sample" in proc.stdout
