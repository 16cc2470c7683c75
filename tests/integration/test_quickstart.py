"""`vlmalign quickstart` on a few ShapesWorld images with a few steps per stage: the report has
every stage with its documented metrics, the rm stage leaves the policy alone, the grpo (or ppo)
stage measures its held-out reward on paraphrased questions before and after, --skip and --rl
work."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vlmalign.data.synthetic import generate_shapesworld
from vlmalign.quickstart import DATA, GRPO_KEYS, render_markdown, render_table, rl_curves, run_quickstart, \
    stage_config, train_rm_stage

SMALL = replace(DATA, train_images=16, eval_images=4)   # the quickstart's layout, fewer images
VQA_KEYS = {"vqa_accuracy", "pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio"}
RM_KEYS = {"rm_accuracy", "rm_margin", "rm_loss", "train_loss", "steps", "rm_samples", "rm_sampled_hallucination"}
DPO_KEYS = {"dpo_accuracy", "dpo_margin", "dpo_chosen_reward", "dpo_rejected_reward", "dpo_loss", "train_loss",
            "steps"}


def _finite(metrics: dict, keys) -> None:
    for k in keys:
        v = metrics[k]
        assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)


def test_quickstart_report_has_the_rm_dpo_and_grpo_stages(tmp_path):
    out = tmp_path / "qs"
    report = run_quickstart(out, data=SMALL, pretrain_steps=1, sft_steps=2, rm_steps=2, dpo_steps=2, rl_steps=2,
                            quiet=True)
    on_disk = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in on_disk["stages"]] == ["base", "pretrain", "sft", "rm", "dpo", "grpo"]
    assert on_disk["stages"] == json.loads(json.dumps(report["stages"]))
    st = {s["name"]: s for s in on_disk["stages"]}
    for s in on_disk["stages"]:
        assert s["seconds"] > 0
    rm, dpo = st["rm"]["metrics"], st["dpo"]["metrics"]
    assert RM_KEYS <= rm.keys() and not VQA_KEYS & rm.keys()   # the reward model does not answer questions
    _finite(rm, RM_KEYS)
    assert rm["steps"] == 2 and 0.0 <= rm["rm_accuracy"] <= 1.0
    assert DPO_KEYS | VQA_KEYS <= dpo.keys()
    _finite(dpo, DPO_KEYS | VQA_KEYS)
    assert dpo["steps"] == 2 and 0.0 <= dpo["dpo_accuracy"] <= 1.0
    # margin = chosen reward - rejected reward (means over the same held-out pairs)
    assert dpo["dpo_margin"] == pytest.approx(dpo["dpo_chosen_reward"] - dpo["dpo_rejected_reward"], abs=1e-5)
    # each stage wrote its run directory with metrics and curves, and report.md shows them
    md = (out / "report.md").read_text()
    for name in ("rm", "dpo", "grpo"):
        run = Path(st[name]["run_dir"])
        assert run == out / name and (run / "metrics.jsonl").exists() and (run / "training.png").exists()
        assert f"![{name}]({name}/training.png)" in md
    assert "held-out description pairs" in md and "What DPO changed (sft -> dpo)" in md
    assert "## What each stage was for, and what it changed" in md
    by_type = md[md.index("## VQA accuracy by question type"):].split("\n\n")[1].splitlines()
    assert [row.split(" | ")[0] for row in by_type[2:]] == ["| base", "| sft", "| dpo", "| grpo"]
    assert "## Benchmarks by stage (base -> sft -> dpo -> grpo)" in md and "| mmbench_accuracy |" in md
    # the DPO reference is the SFT model: its log-probs were cached under the run
    assert any((out / "ref_cache").iterdir())
    # grpo: RL metrics and VQA/POPE, all finite; rewards are exact-match means, so in [0, 1]
    grpo = st["grpo"]["metrics"]
    assert set(GRPO_KEYS) | VQA_KEYS <= grpo.keys()
    _finite(grpo, set(GRPO_KEYS) | VQA_KEYS)
    assert grpo["steps"] == 2 and 0.0 <= grpo["reward_start"] <= 1.0 and 0.0 <= grpo["reward"] <= 1.0
    assert grpo["kl"] >= 0.0
    # reward_start is the held-out measurement at step 0, reward the one after the last step
    curve = rl_curves(st["grpo"]["run_dir"])
    assert curve[0]["step"] == 0 and curve[0]["reward"] == grpo["reward_start"]
    assert curve[-1]["step"] == 2 and curve[-1]["reward"] == grpo["reward"] and curve[-1]["kl"] == grpo["kl"]
    # at step 0 the policy is its own reference: KL 0
    assert curve[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert "What GRPO changed" in md and "| step | held-out reward | held-out KL |" in md
    assert "held-out paraphrased questions (data_rl/vqa_eval.json" in render_table(on_disk)
    # the RL stage's data: the same images, questions in every phrasing, the image after them
    cfg = json.loads((out / "data_rl" / "manifest.json").read_text())["config"]
    assert cfg["paraphrases"] is True and cfg["image_position"] == "after" == SMALL.image_position
    assert cfg["train_images"] == 2 * 16 and cfg["eval_images"] == SMALL.eval_images


def test_quickstart_rl_ppo_runs_a_ppo_stage(tmp_path):
    out = tmp_path / "qs"
    report = run_quickstart(out, data=SMALL, pretrain_steps=0, sft_steps=1, rm_steps=0, dpo_steps=0, rl="ppo",
                            rl_steps=2, quiet=True)
    assert [s["name"] for s in report["stages"]] == ["base", "sft", "ppo"]
    from vlmalign.config import flat_options, load_config
    saved = flat_options(load_config(type(stage_config("ppo", out)), out / "ppo" / "config.yaml"))
    want = flat_options(stage_config("ppo", out, steps=2))
    assert {k for k in saved if saved[k] != want[k]} <= SET_BY_RUN      # the ppo recipe, at 2 steps
    ppo = report["stages"][-1]
    assert set(GRPO_KEYS) | VQA_KEYS <= ppo["metrics"].keys()
    _finite(ppo["metrics"], set(GRPO_KEYS) | VQA_KEYS)
    assert ppo["metrics"]["steps"] == 2 and Path(ppo["run_dir"]) == out / "ppo"
    curve = rl_curves(ppo["run_dir"])
    assert curve[0]["reward"] == ppo["metrics"]["reward_start"] and curve[-1]["reward"] == ppo["metrics"]["reward"]
    # the critic was trained: its value loss is logged
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.endswith("value_loss") for r in rows for k in r)
    md = (out / "report.md").read_text()
    assert "What PPO changed" in md and "![ppo](ppo/training.png)" in md
    with pytest.raises(ValueError, match="grpo, ppo"):
        run_quickstart(tmp_path / "bad", data=SMALL, rl="reinforce", quiet=True)

def test_a_stage_with_zero_steps_is_left_out(tmp_path):
    report = run_quickstart(tmp_path / "qs", data=SMALL, pretrain_steps=0, sft_steps=1, rm_steps=0, dpo_steps=1,
                            rl_steps=0, quiet=True)
    assert [s["name"] for s in report["stages"]] == ["base", "sft", "dpo"]
    assert not (tmp_path / "qs" / "rm").exists() and not (tmp_path / "qs" / "grpo").exists()


def test_the_rm_stage_trains_a_copy_and_leaves_the_policy_alone(tmp_path):
    from vlmalign.models import adapter_for, build_tiny
    data = tmp_path / "data"
    generate_shapesworld(data, SMALL)
    adapter = adapter_for(*build_tiny("llava", seed=0))
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    cfg = stage_config("rm", tmp_path, steps=2, seed=0)   # its data: tmp_path / "data"
    cfg.train.progress = False
    m, rm = train_rm_stage(adapter, cfg)
    assert rm.adapter is not adapter and rm.adapter.model is not adapter.model
    after = adapter.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ... while the reward model's language model did move
    moved = [k for k, v in rm.adapter.model.state_dict().items() if "language_model" in k and k in before
             and not torch.equal(v, before[k])]
    assert moved
    # the reward model learns from the description pairs; the dpo stage trains on them with the
    # existence-question pairs beside them, the starting model as reference
    assert cfg.data.train_file.endswith("hallucination_train.json") and cfg.data.eval_file.endswith("hallucination_eval.json")
    d = stage_config("dpo", tmp_path, steps=3, seed=0)
    assert d.data.train_file.endswith("hallucination_qa_train.json")
    assert d.data.eval_file.endswith("hallucination_qa_eval.json")
    assert d.dpo.precompute_ref_logps and d.ref.path is None and d.data.max_train_samples == 3 * d.train.batch_size


def test_markdown_shows_what_dpo_changed():
    report = {"family": "llava", "seed": 0, "total_seconds": 1.0, "stages": [
        {"name": "sft", "metrics": {"vqa_accuracy": 0.50, "pope_accuracy": 0.60, "pope_yes_ratio": 0.40},
         "seconds": 1.0},
        {"name": "rm", "metrics": {"rm_accuracy": 0.70, "rm_margin": 1.5, "rm_loss": 0.55}, "seconds": 1.0},
        {"name": "dpo", "metrics": {"vqa_accuracy": 0.55, "pope_accuracy": 0.58, "pope_yes_ratio": 0.45,
                                    "dpo_accuracy": 0.65, "dpo_margin": 0.3, "dpo_chosen_reward": -1.0,
                                    "dpo_rejected_reward": -1.3, "dpo_loss": 0.6}, "seconds": 1.0}]}
    md = render_markdown(report, Path("."))
    # the change is dpo - sft: 0.55 - 0.50 = +0.05, 0.58 - 0.60 = -0.02, 0.45 - 0.40 = +0.05
    assert "| vqa_accuracy | 0.500 | 0.550 | +0.050 |" in md
    assert "| pope_accuracy | 0.600 | 0.580 | -0.020 |" in md
    assert "| pope_yes_ratio | 0.400 | 0.450 | +0.050 |" in md
    # the preference table: rm row has no rewards, dpo row has them all
    lines = md.splitlines()
    pref = lines[lines.index("held-out description pairs (hallucination_eval.json)"):]
    assert pref[1].split() == ["stage", "accuracy", "margin", "chosen_reward", "rejected_reward", "loss"]
    assert pref[3].split() == ["rm", "0.700", "1.500", "-", "-", "0.550"]
    assert pref[4].split() == ["dpo", "0.650", "0.300", "-1.000", "-1.300", "0.600"]


def test_markdown_says_what_each_stage_was_for_and_plots_hallucination(tmp_path):
    report = {"family": "llava", "seed": 0, "total_seconds": 1.0, "stages": [
        {"name": "base", "metrics": {"vqa_accuracy": 0.0, "chair_i": float("nan"), "chair_s": 0.0}, "seconds": 1.0},
        {"name": "sft", "metrics": {"vqa_accuracy": 0.9, "chair_i": 0.2, "chair_s": 0.4, "pope_f1": 0.7,
                                    "pope_yes_ratio": 0.6}, "seconds": 1.0},
        {"name": "rm", "metrics": {"rm_accuracy": 0.97, "rm_spearman": -0.5}, "seconds": 1.0},
        {"name": "dpo", "metrics": {"vqa_accuracy": 0.89, "chair_i": 0.05, "chair_s": 0.1, "pope_f1": 0.72,
                                    "pope_yes_ratio": 0.5}, "seconds": 1.0},
        {"name": "grpo", "metrics": {"vqa_accuracy": 0.88, "chair_i": 0.06, "chair_s": 0.1, "reward_start": 0.5,
                                     "reward": 0.8, "steps": 2}, "seconds": 1.0}]}
    md = render_markdown(report, tmp_path)
    rows = {r.split(" | ")[0][2:]: r for r in md.splitlines() if r.startswith("| ") and (" -> " in r or "pairs:" in r)}
    # sft against base, dpo against sft (the model it started from), grpo against its own start
    assert "| vqa_accuracy | base 0.000 -> 0.900 | +0.900 (better) |" in rows["sft"]
    assert "| rm_accuracy | held-out pairs: 0.970 | - | rank correlation" in rows["rm"] and "-0.500" in rows["rm"]
    assert "| chair_i | sft 0.200 -> 0.050 | -0.150 (better) | vqa_accuracy 0.900 -> 0.890; pope_f1 0.700 -> 0.720 |" \
        in rows["dpo"]
    assert "| reward | its start 0.500 -> 0.800 | +0.300 (better) | chair_i 0.050 -> 0.060; vqa_accuracy 0.890 -> " \
        "0.880 |" in rows["grpo"]
    # the plot has the stages whose descriptions mention objects (base's CHAIR_i is NaN: none)
    assert "![hallucination by stage](hallucination.png)" in md and (tmp_path / "hallucination.png").stat().st_size
    assert "hallucination.png" not in render_markdown({**report, "stages": report["stages"][:3]}, tmp_path / "x")


def test_cli_skip_maps_to_zero_steps(monkeypatch, tmp_path, capsys):
    import vlmalign.quickstart as qs
    from vlmalign.cli.main import main
    seen = {}
    monkeypatch.setattr(qs, "run_quickstart", lambda out, **kw: seen.update(out=out, **kw))
    assert main(["quickstart", "--out", str(tmp_path), "--skip", "rm, dpo,grpo"]) == 0
    assert seen["rm_steps"] == 0 and seen["dpo_steps"] == 0 and seen["rl_steps"] == 0
    assert "sft_steps" not in seen and "pretrain_steps" not in seen and seen["rl"] == "grpo"
    seen.clear()
    assert main(["quickstart", "--out", str(tmp_path), "--rl", "ppo", "--skip", "ppo"]) == 0
    assert seen["rl"] == "ppo" and seen["rl_steps"] == 0
    seen.clear()
    assert main(["quickstart", "--out", str(tmp_path), "--rl", "ppo"]) == 0
    assert not any(k.endswith("_steps") for k in seen) and seen["rl"] == "ppo"
    assert main(["quickstart", "--skip", "rm,reinforce"]) == 2
    assert "--skip: unknown stage(s) reinforce; choose from pretrain, sft, rm, dpo, grpo, ppo" in capsys.readouterr().err


def test_markdown_shows_what_grpo_changed():
    report = {"family": "llava", "seed": 0, "total_seconds": 1.0, "stages": [
        {"name": "grpo", "metrics": {"vqa_accuracy": 0.6, "reward_start": 0.55, "reward": 0.62, "kl": 0.0123,
                                     "steps": 40}, "seconds": 1.0}]}
    md = render_markdown(report, Path("."))
    # 0.62 - 0.55 = +0.07
    assert "reward 0.550 -> 0.620 (+0.070) in 40 steps; KL(policy || start) per answer token: 0.0123." in md
    table = render_table(report).splitlines()
    assert table[-1].split() == ["grpo", "0.5500", "0.6200", "0.0123"]


def test_stage_configs_rerun_from_the_model_they_started_from_and_out_is_not_reused(tmp_path):
    import yaml

    from vlmalign.config import load_config
    from vlmalign.errors import VlmalignError
    from vlmalign.methods.sft import SFTConfig
    out = tmp_path / "qs"
    run_quickstart(out, data=SMALL, pretrain_steps=1, sft_steps=1, rm_steps=0, dpo_steps=0, rl_steps=0, quiet=True)
    pre = yaml.safe_load((out / "pretrain" / "config.yaml").read_text())
    sft = yaml.safe_load((out / "sft" / "config.yaml").read_text())
    assert pre["model"]["path"] == str((out / "base_model").resolve()) and pre["model"]["tiny"] is None
    assert sft["model"]["path"] == str(out / "pretrain" / "checkpoints" / "step-1" / "model")
    assert (Path(sft["model"]["path"]) / "config.json").exists()
    with pytest.raises(VlmalignError, match="already holds a quickstart run: pass --overwrite"):
        run_quickstart(out, data=SMALL, pretrain_steps=1, sft_steps=1, rm_steps=0, dpo_steps=0, rl_steps=0,
                       quiet=True)
    # the saved config reruns the stage as it is (into a new directory)
    from vlmalign.methods.sft import train_sft
    cfg = load_config(SFTConfig, out / "sft" / "config.yaml", [f"train.output_dir={tmp_path / 'again'}",
                                                                "train.overwrite=false"])
    result, _ = train_sft(cfg)
    assert result.step == 1
    run_quickstart(out, data=SMALL, pretrain_steps=1, sft_steps=1, rm_steps=0, dpo_steps=0, rl_steps=0, quiet=True,
                   overwrite=True)


# ----------------------------------------------------------------------------- the stages are the recipes
STAGES = ("pretrain", "sft", "rm", "dpo", "grpo", "ppo")
# what the quickstart sets on top of a recipe, besides its paths and seed: where the stage starts
# from and how it runs (progress display, replacing an earlier run)
SET_BY_RUN = {"model.path", "model.tiny", "train.progress", "train.overwrite"}


def _assert_recipe_under_out(cfg, recipe, out, sub: dict) -> dict:
    """``cfg`` equals ``recipe`` with each path that starts with a key of ``sub`` moved under
    ``out`` (``out / sub[prefix] / rest``); returns ``cfg``'s flat options."""
    from vlmalign.config import flat_options
    a, b = flat_options(cfg), flat_options(recipe)
    assert a.keys() == b.keys()

    def under_out(v):
        if isinstance(v, str) and v.startswith(tuple(sub)):
            prefix = next(p for p in sub if v.startswith(p))
            return str(out / (sub[prefix] + v[len(prefix):]))
        return v
    for key in a:
        if isinstance(b[key], list):   # eval.tasks: the paths inside each entry move too
            assert a[key] == [{k: under_out(v) for k, v in e.items()} if isinstance(e, dict) else e
                              for e in b[key]], key
        else:
            assert a[key] == under_out(b[key]), key
    return a


@pytest.mark.parametrize("stage", STAGES)
def test_at_the_recipe_step_count_a_stage_config_is_its_recipe_under_out(stage, tmp_path):
    from vlmalign.quickstart import load_recipe
    cfg, recipe = stage_config(stage, tmp_path), load_recipe(stage)
    a = _assert_recipe_under_out(cfg, recipe, tmp_path, {"data/shapesworld_rl/": "data_rl/", "data/shapesworld/": "data/",
                                                         "runs/quickstart/": ""})
    if stage not in ("rm", "pretrain"):   # the stages that answer are measured on the benchmark files
        assert any(e["data"].startswith(str(tmp_path / "data" / "benchmarks")) for e in a["eval.tasks"])


def test_the_recipes_chain_the_stages_as_the_quickstart_does():
    from vlmalign.quickstart import load_recipe
    r = {s: load_recipe(s) for s in STAGES}

    def last(stage):
        return f"{r[stage].train.output_dir}/checkpoints/step-{r[stage].train.max_steps}/model"
    assert r["sft"].model.path == last("pretrain")
    assert r["rm"].model.path == r["dpo"].model.path == last("sft")
    assert r["grpo"].model.path == r["ppo"].model.path == last("dpo")


def test_each_stage_of_a_run_is_its_recipe(tmp_path):
    """A short quickstart: every stage's saved config.yaml is its recipe under --out with the step
    count it was asked for (and what follows from it), differing only where the run says."""
    from vlmalign.config import flat_options, load_config
    from vlmalign.quickstart import load_recipe
    out = tmp_path / "qs"
    run_quickstart(out, data=SMALL, pretrain_steps=1, sft_steps=1, rm_steps=1, dpo_steps=1, rl_steps=1, quiet=True)
    for stage in ("pretrain", "sft", "rm", "dpo", "grpo"):
        saved = flat_options(load_config(type(load_recipe(stage)), out / stage / "config.yaml"))
        want = flat_options(stage_config(stage, out, steps=1))
        assert saved.keys() == want.keys()
        assert {k for k in saved if saved[k] != want[k]} <= SET_BY_RUN, stage
        assert saved["train.max_steps"] == 1


# ------------------------------------------------------------------------------ --preset real
REAL_STAGES = ("pretrain", "sft_lora", "dpo_lora")


@pytest.mark.parametrize("stage", REAL_STAGES)
def test_real_preset_stage_config_is_its_recipe_under_out(stage, tmp_path):
    """recipes/quickstart_real/: paths under --out (data/shapesworld_real/ -> data/), the rest as
    written at the recipe's step count; every stage is measured on the benchmark files."""
    from vlmalign.quickstart.plan import load_recipe
    cfg, recipe = stage_config(stage, tmp_path, preset="real"), load_recipe(stage, "real")
    a = _assert_recipe_under_out(cfg, recipe, tmp_path, {"data/shapesworld_real/": "data/", "runs/quickstart_real/": ""})
    assert any(e["data"].startswith(str(tmp_path / "data" / "benchmarks")) for e in a["eval.tasks"])


def test_real_preset_plan_and_recipes_chain():
    from vlmalign.quickstart.plan import load_recipe, plan_of
    plan = plan_of("real")
    assert list(plan["stages"].values()) == list(REAL_STAGES)
    r = {s: load_recipe(s, "real") for s in REAL_STAGES}
    assert r["pretrain"].model.path == "runs/quickstart_real/base_model"
    assert r["sft_lora"].model.path == \
        f"{r['pretrain'].train.output_dir}/checkpoints/step-{r['pretrain'].train.max_steps}/model"
    assert r["dpo_lora"].model.path == "runs/quickstart_real/sft_merged"   # the quickstart's merged SFT
    assert r["sft_lora"].lora.enabled and r["dpo_lora"].lora.enabled
    assert plan["compose"]["vision"] == "efficientnet-lite0" and plan["compose"]["llm"] == "smollm2-135m-instruct"
