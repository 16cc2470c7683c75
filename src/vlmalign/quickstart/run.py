"""The main job: a tiny VLM learns ShapesWorld end to end, offline, on a CPU.

Stages (each row of ``report.json``); every training stage runs the recipe of its name in
``recipes/quickstart/`` (:mod:`.plan`):

* ``base``     -- the untrained model, measured on held-out data;
* ``pretrain`` -- projector-only training on captions (LLaVA stage 1), not measured;
* ``sft``      -- fine-tuning on the SFT mix (VQA conversations and descriptions, a share of them
  hallucinated, ``plan.yaml``), measured on held-out data;
* ``rm``       -- a reward model (scalar head on a copy of the SFT model) trained on ShapesWorld
  description pairs (faithful against hallucinated, and against one object left out), measured
  by held-out pairwise accuracy and by the rank correlation of its scores with the verifier's
  hallucination count on the SFT model's own sampled descriptions (:mod:`.hallucination`);
* ``dpo``      -- DPO of the SFT model on the same description pairs (the SFT model is the
  reference), measured by held-out preference accuracy and again by VQA, POPE and CHAIR;
* ``grpo``     -- GRPO (or ``ppo``, PPO with a critic, with ``rl="ppo"``) of the model the earlier
  stages left (DPO, else SFT) with the ShapesWorld verifiable reward (exact match against the
  reference answer) on paraphrased questions SFT never saw, measured by held-out reward before
  and after, and again by VQA and POPE.

Metrics per stage: every answering stage (base, sft, dpo, grpo / ppo) is measured by its recipe's
``eval.tasks`` (the base model by the sft recipe's), ``vlmalign eval``'s code path, on the held-out
split written in benchmark layouts (``data/benchmarks/``): ``vqa_accuracy`` (exact match after
normalisation) and its split per question type, POPE's ``pope_accuracy``, ``pope_f1``,
``pope_precision``, ``pope_recall``, ``pope_yes_ratio`` pooled and per split, ``mmbench_accuracy``
(CircularEval) and ``chair_s`` / ``chair_i``; training stages add ``train_loss`` (last logged
value) and ``steps``. The ``rm`` stage reports ``rm_accuracy``,
``rm_margin``, ``rm_loss``, ``rm_spearman`` (``rm_spearman_errors``, ``rm_samples``,
``rm_sampled_hallucination``) instead (it does not answer); the ``dpo`` stage
adds ``dpo_accuracy``, ``dpo_margin``, ``dpo_chosen_reward``, ``dpo_rejected_reward`` and
``dpo_loss``; the ``grpo`` / ``ppo`` stage adds ``reward``, ``reward_start``, ``kl``, ``train_reward`` and
``train_kl``. Any training stage can be skipped with ``<stage>_steps=0``.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import replace
from pathlib import Path

from ..data.synthetic import generate_shapesworld
from ..data.synthetic.benchmarks import write_benchmarks
from ..files import write_json
from ..methods.setup import seed_everything
from ..methods.registry import get
from ..models import adapter_for, build_tiny, load_adapter
from .plan import (PRESETS, RL_METHODS, data_config, method_of, plan_of, recipe_steps, rl_data_config, stage_config,
                   tiny_settings)
from .report import render_markdown, render_table

DATA = data_config()


def task_metrics(metrics: dict, tasks) -> dict:
    """A run's ``eval/<name>/<metric>`` results of its ``eval.tasks`` as report names:
    ``<name>_<metric>`` (``vqa_accuracy``, ``pope_f1``, ``pope_random/f1``, ``mmbench_accuracy``),
    a metric that already starts with the name kept as it is (``chair_s``)."""
    out = {}
    for entry in tasks:
        name = entry.get("name", entry["task"])
        pre = f"eval/{name}/"
        for k, v in metrics.items():
            if k.startswith(pre):
                m = k[len(pre):]
                out[m if m.startswith(name + "_") else f"{name}_{m}"] = v
    return out


def _measure(adapter, out: Path, tasks) -> dict:
    """The base model on the sft recipe's ``eval.tasks``: the code path of ``vlmalign eval`` and of
    every stage's end-of-run evaluation, run dirs under ``out/base/eval/``."""
    from ..eval.during_training import EvalTasksSection, TaskEvals
    evals = TaskEvals(EvalTasksSection(tasks=tasks))
    evals.prepare()
    return task_metrics(evals.measure(adapter, out / "base" / "eval"), tasks)


def _evaluated(result, tasks) -> dict:
    """A stage's end-of-run evaluation: its eval tasks' metrics under report names, and the
    other ``eval/...`` metrics (held-out loss) without the prefix."""
    names = tuple(f"eval/{e.get('name', e['task'])}/" for e in tasks)
    rest = {k[len("eval/"):]: v for k, v in result.metrics.items() if k.startswith("eval/") and not k.startswith(names)}
    return {**task_metrics(result.metrics, tasks), **rest}


def train_rm_stage(adapter, cfg) -> tuple[dict, object]:
    """Train a reward model on a COPY of ``adapter``'s model (the policy stays as it is), then rank
    the policy's own sampled descriptions of the held-out images with it (:func:`rm_agreement`,
    samples in ``<run dir>/agreement.jsonl``)."""
    from .hallucination import rm_agreement
    rm_adapter = type(adapter)(copy.deepcopy(adapter.model), adapter.processor)
    result, rm = get("rm").train(cfg, adapter=rm_adapter)
    r = result.metrics
    m = {"rm_accuracy": r["eval/accuracy"], "rm_margin": r["eval/margin"], "rm_loss": r["eval/loss"],
         "train_loss": r.get("loss"), "steps": result.step}
    data_dir = Path(cfg.data.eval_file).parent
    m.update(rm_agreement(adapter, rm, data_dir / "captions_eval.json", data_dir, seed=cfg.train.seed,
                          out=Path(cfg.train.output_dir) / "agreement.jsonl"))
    return m, rm


def train_dpo_stage(adapter, cfg) -> tuple[dict, object]:
    """DPO on ``adapter`` (trained in place; the reference is its state before training)."""
    result, adapter = get("dpo").train(cfg, adapter=adapter)
    r = result.metrics
    m = {**task_metrics(r, cfg.eval.tasks), "dpo_accuracy": r["eval/accuracy"], "dpo_margin": r["eval/margin"],
         "dpo_chosen_reward": r["eval/chosen_reward"], "dpo_rejected_reward": r["eval/rejected_reward"],
         "dpo_loss": r["eval/loss"], "train_loss": r.get("loss"), "steps": result.step}
    return m, adapter


def train_rl_stage(method: str, adapter, cfg) -> tuple[dict, object]:
    """GRPO or PPO on ``adapter`` (trained in place; the reference is a frozen copy of its
    starting state). Returns the stage's RL metrics (``report.GRPO_KEYS``) and the adapter."""
    from ..engine.run_dir import RunDir
    result, adapter = get(method).train(cfg, adapter=adapter)
    r = result.metrics
    rows = RunDir(cfg.train.output_dir).read_metrics()
    start = next((row for row in rows if row.get("step") == 0 and "eval/reward" in row), None)
    if start is None or "eval/reward" not in r:
        raise RuntimeError(f"{cfg.train.output_dir}: the {method} stage did not measure the held-out reward "
                           f"(data.eval_file={cfg.data.eval_file})")
    m = {**task_metrics(r, cfg.eval.tasks), "reward": r["eval/reward"], "reward_start": start["eval/reward"], "kl": r.get("eval/kl"),
         "train_reward": r.get("reward"), "train_kl": r.get("kl"), "train_loss": r.get("loss"),
         "steps": result.step}
    return m, adapter


def run_quickstart(out: str | Path = "runs/quickstart", *, family: str = "llava", seed: int = 0,
                   pretrain_steps: int | None = None, sft_steps: int | None = None, data=None,
                   quiet: bool = False, rm_steps: int | None = None, dpo_steps: int | None = None,
                   rl: str = "grpo", rl_steps: int | None = None, overwrite: bool = False,
                   preset: str = "tiny") -> dict:
    """Run the stages and write ``report.json`` / ``report.md`` under ``out``. ``<stage>_steps``:
    that stage's steps (default: its recipe's; 0 skips it); later stages start from the model the
    earlier ones left (rm and dpo from the SFT model when it ran, the RL stage from the DPO or
    else the SFT model). ``rl``: the RL stage's method, ``grpo`` or ``ppo`` (also its name in the
    report). ``data``: a :class:`~vlmalign.data.synthetic.ShapesConfig` instead of the plan's
    (tests use fewer images). An ``out`` that holds an earlier quickstart is refused unless
    ``overwrite`` (its stages' runs are then replaced).

    Each stage's ``config.yaml`` names the model it started from (``model.path``: ``base_model/``
    or the previous stage's last checkpoint), so ``vlmalign train METHOD --config`` reruns it.

    ``preset="real"`` (``plan_real.yaml``): the base model is composed from pretrained parts
    (``vlmalign models compose``, the plan's ``compose``; ``family`` is ignored), the stages are
    the plan's (pretrain, LoRA SFT, LoRA DPO), every stage is measured, and each stage loads the
    model the one before it left from disk (a LoRA stage's adapter merged into its base first)."""
    if rl not in RL_METHODS:
        raise ValueError(f"unknown RL stage {rl!r}; choose from {', '.join(RL_METHODS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    plan = plan_of(preset)
    data = (DATA if preset == "tiny" else data_config(preset=preset)) if data is None else data
    stages_plan = plan["stages"]
    recipe_of = {name: (r[rl] if name == "rl" else r) for name, r in stages_plan.items() if name != "rl" or rl in r}
    if "rl" in recipe_of:
        recipe_of[rl] = recipe_of.pop("rl")
    asked = {"pretrain": pretrain_steps, "sft": sft_steps, "rm": rm_steps, "dpo": dpo_steps, rl: rl_steps}
    steps = {name: recipe_steps(recipe_of[name], preset) if asked[name] is None else asked[name]
             for name in recipe_of}
    out = Path(out)
    _claim(out, overwrite)
    shutil.rmtree(out / "base", ignore_errors=True)   # an earlier run's base evals: they would resume, not rerun
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    say = (lambda *a: None) if quiet else print

    say(f"[quickstart] generating ShapesWorld in {out / 'data'}")
    data_dir = out / "data"
    generate_shapesworld(data_dir, replace(data, seed=seed))
    write_benchmarks(data_dir)   # the held-out split in benchmark layouts, as `data synth shapes` writes it
    tasks = stage_config(recipe_of["sft"], out, preset=preset).eval.tasks   # what the sft recipe scores, and how

    start = out / "base_model"  # the model each stage's config.yaml names as model.path
    seed_everything(seed)
    if preset == "tiny":
        say(f"[quickstart] building a tiny random-init {family} model")
        model, processor = build_tiny(family, seed=seed, **tiny_settings(family))
        adapter = adapter_for(model, processor)
        adapter.save_pretrained(str(start))
    else:
        family = _compose_base(plan["compose"], start, say)
        adapter = load_adapter(str(start))
    fresh = preset != "tiny"   # stages load the model the stage before left, from disk
    stages = []

    def config_of(name: str):
        cfg = stage_config(recipe_of[name], out, steps=steps[name], seed=seed, preset=preset)
        cfg.train.progress = not quiet
        cfg.train.overwrite = overwrite
        cfg.model.path, cfg.model.tiny = str(start.resolve()), None
        return cfg

    t = time.time()
    m = _measure(adapter, out, tasks)
    m.update(_chair_breakdown(out / "base", data_dir))
    stages.append({"name": "base", "metrics": m, "seconds": time.time() - t})
    say(f"[quickstart] base: vqa_accuracy={stages[-1]['metrics']['vqa_accuracy']:.3f}")

    for name in recipe_of:
        if steps[name] <= 0:
            continue
        cfg = config_of(name)
        if name == rl:
            rl_dir = out / "data_rl"
            say(f"[quickstart] generating paraphrased ShapesWorld questions for {rl} in {rl_dir}")
            generate_shapesworld(rl_dir, rl_data_config(data, seed, steps[rl], cfg.rollout.prompts_per_step))
        say(f"[quickstart] {name}: {steps[name]} steps on {Path(cfg.data.train_file).name}")
        t = time.time()
        if name in ("pretrain", "sft"):
            # their recipes' end-of-run evaluation (VQA and POPE) is the stage's measurement
            result, adapter = get(method_of(recipe_of[name])).train(cfg, adapter=None if fresh else adapter)
            start = Path(result.checkpoint) / "model"
            if fresh and cfg.lora.enabled:   # the next stage starts from the adapter merged into its base
                from ..models.peft import export_merged
                start = Path(export_merged(str(start), str(out / f"{name}_merged")))
            m = {**_evaluated(result, cfg.eval.tasks), "train_loss": result.metrics.get("loss"), "steps": result.step}
            train_s = time.time() - t
        elif name == "rm":
            m, rm = train_rm_stage(adapter, cfg)
            del rm  # a copy: the policy the next stage trains is unchanged
            train_s = time.time() - t
        else:
            prior = None if fresh else adapter
            trained, adapter = train_dpo_stage(prior, cfg) if name == "dpo" else train_rl_stage(rl, prior, cfg)
            start = _last_model(cfg)
            train_s = time.time() - t
            m = trained
        if "chair_i" in m:
            m.update(_chair_breakdown(Path(cfg.train.output_dir) / "eval", data_dir))
        stages.append({"name": name, "metrics": m, "seconds": time.time() - t, "train_seconds": train_s,
                       "run_dir": cfg.train.output_dir})
        say(f"[quickstart] {name}: {_summary(m)} ({time.time() - t:.0f}s)")

    report = {"family": family, "preset": preset, "seed": seed, "data": str(data_dir), "stages": stages,
              "total_seconds": time.time() - t_all}
    write_json(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report, out))
    say("")
    say(render_table(report))
    say(f"\nreport: {out / 'report.json'} and {out / 'report.md'}")
    return report


def _summary(m: dict) -> str:
    parts = []
    if "rm_accuracy" in m:
        parts.append(f"rm_accuracy={m['rm_accuracy']:.3f}")
    if "dpo_accuracy" in m:
        parts.append(f"dpo_accuracy={m['dpo_accuracy']:.3f}")
    if "reward_start" in m:
        parts.append(f"reward {m['reward_start']:.3f} -> {m['reward']:.3f}")
    if "rm_spearman" in m:
        parts.append(f"rm_spearman={m['rm_spearman']:.3f}")
    if "vqa_accuracy" in m:
        parts.append(f"vqa_accuracy={m['vqa_accuracy']:.3f}")
    if isinstance(m.get("chair_i"), float):
        parts.append(f"chair_i={m['chair_i']:.3f}")
    if not parts and isinstance(m.get("train_loss"), float):
        parts.append(f"train_loss={m['train_loss']:.3f}")   # pretrain: not measured
    return " ".join(parts)


def _chair_breakdown(eval_dir: Path, data_dir: Path) -> dict:
    """:func:`.hallucination.chair_breakdown` of the last ``chair`` eval under ``eval_dir``
    (``eval/chair`` or ``eval/step-N/chair``); {} when none ran."""
    from .hallucination import chair_breakdown
    found = sorted(eval_dir.glob("**/chair/predictions.jsonl"),
                   key=lambda p: int(p.parent.parent.name.split("-")[-1]) if p.parent.parent.name.startswith("step-")
                   else -1)
    return chair_breakdown(found[-1].parent, data_dir) if found else {}


def _compose_base(spec: dict, start: Path, say) -> str:
    """The real preset's base model: ``vlmalign models compose`` with the plan's options, reused
    where ``start`` already holds that composition. Returns its name for the report."""
    import json

    from ..models.compose import ComposeOptions, compose
    opts = {k: v for k, v in spec.items() if k not in ("vision", "llm")}
    name = f"{spec['vision']} + {spec['llm']} ({spec.get('projector', 'mlp2x_gelu')})"
    record = start / "vlmalign_compose.json"
    if record.is_file():
        old = json.loads(record.read_text())
        if (old["vision"], old["llm"]) == (spec["vision"], spec["llm"]) and \
                old["options"] == {**vars(ComposeOptions()), **opts}:
            say(f"[quickstart] reusing the composed {name} in {start}")
            return name
    say(f"[quickstart] composing {name} into {start}")
    compose(spec["vision"], spec["llm"], str(start), ComposeOptions(**opts))
    return name


def _claim(out: Path, overwrite: bool) -> None:
    from ..engine.run_dir import holds_run
    from ..errors import VlmalignError
    earlier = (out / "report.json").exists() or (out.is_dir() and any(holds_run(p) for p in out.iterdir()
                                                                      if p.is_dir()))
    if earlier and not overwrite:
        raise VlmalignError(f"{out} already holds a quickstart run: pass --overwrite to replace it "
                            "(overwrite=True from Python) or choose another --out")


def _last_model(cfg) -> Path:
    from ..engine.checkpoint import latest_checkpoint
    return latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints") / "model"
