"""Keeps scripts/hallucination_methods.py from rotting: a tiny quickstart, then a few of its
routes for one step each (data pairs, KTO's unpaired copy, best-of-n with the reward model, PPO
with the reward model as reward). Nothing is measured: each route must run, be recorded without
an error and carry the benchmark metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from vlmalign.quickstart import DATA, run_quickstart

ROOT = Path(__file__).resolve().parents[2]


def test_routes_run_and_are_recorded(tmp_path):
    qs = tmp_path / "qs"
    run_quickstart(qs, data=replace(DATA, train_images=16, eval_images=4), pretrain_steps=1, sft_steps=2,
                   rm_steps=2, dpo_steps=2, rl_steps=1, quiet=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "hallucination_methods.py"), "--runs", str(qs),
                        "--out", str(tmp_path / "m"), "--steps", "1", "--rl-steps", "1", "--limit", "4",
                        "--rows", "ipo,kto,best_of_n_rm,ppo_rm"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads((tmp_path / "m" / "methods.json").read_text())}
    assert {"quickstart sft", "quickstart dpo", "quickstart grpo"} <= rows.keys()
    for name in ("ipo", "kto", "ppo_rm"):
        assert rows[name]["error"] is None, rows[name]
        assert 0.0 <= rows[name]["vqa_accuracy"] <= 1.0 and 0.0 <= rows[name]["pope_f1"] <= 1.0
    assert rows["best_of_n_rm"]["error"] is None and 0.0 <= rows["best_of_n_rm"]["chair_s"] <= 1.0
    md = (tmp_path / "m" / "methods.md").read_text()
    assert md.startswith("| route | seeds | chair_i |") and "| kto | 1 |" in md
