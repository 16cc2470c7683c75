"""The main job: a tiny VLM learns ShapesWorld end to end, offline, on a CPU.

Stages (each row of ``report.json``):

* ``base``     -- the untrained model, measured on held-out data;
* ``pretrain`` -- projector-only training on captions (LLaVA stage 1), measured again;
* ``sft``      -- full fine-tuning on VQA conversations, measured on held-out data;
* ``rm``       -- a reward model (scalar head on a copy of the SFT model) trained on ShapesWorld
  preferences, measured by held-out pairwise accuracy;
* ``dpo``      -- DPO of the SFT model on ShapesWorld hallucination pairs (the SFT model is the
  reference), measured by held-out preference accuracy and again by VQA and POPE;
* ``grpo``     -- GRPO (or ``ppo``, PPO with a critic, with ``rl="ppo"``) of the model the earlier
  stages left (DPO, else SFT) with the ShapesWorld verifiable reward (exact match against the
  reference answer) on paraphrased questions SFT never saw (:mod:`vlmalign.quickstart_rl`),
  measured by held-out reward before and after, and again by VQA and POPE.

Metrics per stage: ``vqa_accuracy`` (exact match after normalisation) and its split per question
type, the POPE-style ``pope_accuracy``, ``pope_f1``, ``pope_precision``, ``pope_recall`` and
``pope_yes_ratio`` (existence questions about present and absent objects), and for training
stages ``train_loss`` (last logged value) and ``steps``. The ``rm`` stage reports ``rm_accuracy``,
``rm_margin`` and ``rm_loss`` instead of VQA metrics (it does not generate); the ``dpo`` stage
adds ``dpo_accuracy``, ``dpo_margin``, ``dpo_chosen_reward``, ``dpo_rejected_reward`` and
``dpo_loss``; the ``grpo`` / ``ppo`` stage adds ``reward``, ``reward_start``, ``kl``, ``train_reward`` and
``train_kl``. Any training stage can be skipped with ``<stage>_steps=0``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path

from .data.batching import ImageLoader
from .data.readers import read_file
from .data.synthetic import ShapesConfig, generate_shapesworld
from .eval.vqa import evaluate_pope, evaluate_vqa
from .methods.common import seed_everything, write_json
from .methods.sft import SFTConfig, pretrain_config, train_sft
from .models import adapter_for, build_tiny
from .quickstart_rl import RL_METHODS, RL_PROMPTS, RL_STEPS, rl_data_config, rl_markdown, rl_stage_config, rl_table, \
    train_rl_stage

# Sizes chosen so the whole job takes a few minutes on 2 CPU cores. Measured on ShapesWorld
# (scripts/learnability.py sweep, 2,000 steps, held-out vqa_accuracy): with 1,200 training images
# the tiny model memorises (about 0.55); 6,000 images keep it climbing. 16-pixel patches (16 image
# tokens) are about 3x cheaper per step than 8-pixel ones at similar accuracy per second. The
# image after the question, one question per record: 0.978 (0.916 at 1,000 steps) against 0.706
# with the image first in records of up to 3 questions -- a causal LM's image tokens then see
# the question (README, Quickstart).
DATA = ShapesConfig(seed=0, train_images=6000, eval_images=100, image_position="after", max_turns=1)
PRETRAIN_STEPS = 50
SFT_STEPS = 1500     # held-out vqa_accuracy 0.964 in the default run (about a minute)
# Per-family overrides of the tiny builder's defaults. A width-64 LM initialised at std 1/sqrt(64)
# instead of transformers' 0.02 learned ShapesWorld VQA faster; with it, SFT at lr 1e-3 beat 3e-3
# and 6e-3 (scripts/learnability.py sweep, 2,000 steps: 0.81, 0.73, 0.60 held-out; 0.59 at the
# old init).
TINY: dict[str, dict] = {"llava": {"init_std": 0.125}}

# The preference stages (rm, dpo) start from the SFT model. Chosen by held-out accuracy on 1,200
# extra ShapesWorld pairs (seed 7), batch 16, from a 2,000-step SFT model (built before TINY's
# init_std; README, Quickstart): rm: pairs and ranked caption lists scored alike (0.59-0.61 at
# 150 steps), pairs cost 2 candidates per record instead of 3; full fine-tuning >= LoRA (on the
# 200 quickstart pairs); lr 3e-4 > 1e-3 > 1e-4; 300 steps 0.63. dpo: full fine-tuning kept
# vqa_accuracy (0.640 -> 0.644) where LoRA lr 1e-3 lost 0.03 at the same preference accuracy;
# beta 0.5 > 0.1 (0.72 vs 0.68); lr 3e-4 gained 0.01 but lost 0.02 vqa_accuracy; 300 steps
# gained 0.01.
PREF_BATCH = 16
RM_STEPS = 300
RM_LISTS = False    # the hallucination pairs (dpo_train.json) rather than ranked caption lists
RM_LORA = False
RM_LR = 3e-4
DPO_STEPS = 150
DPO_LORA = False
DPO_LR = 1e-4
DPO_BETA = 0.5


def _measure(adapter, data_dir: Path, vqa, pope) -> dict:
    loader = ImageLoader(adapter, data_dir)
    m, _ = evaluate_vqa(adapter, vqa, loader, max_new_tokens=6, batch_size=64)
    m.update(evaluate_pope(adapter, pope, loader, batch_size=64))
    return m


def _stage_cfg(base: SFTConfig, out: Path, name: str, train_file: Path, steps: int, seed: int, lr: float,
               batch_size: int) -> SFTConfig:
    cfg = base
    cfg.data.train_file = str(train_file)
    cfg.data.image_root = str(train_file.parent)
    cfg.data.max_length = 256
    cfg.train.output_dir = str(out / name)
    cfg.train.max_steps = steps
    cfg.train.batch_size = batch_size
    cfg.train.seed = seed
    cfg.train.log_every = 10
    cfg.train.keep_last = 1
    cfg.optim.lr = lr
    cfg.optim.warmup_ratio = 0.05
    cfg.optim.weight_decay = 0.0
    return cfg


def _pref_cfg(cfg, out: Path, name: str, train_file: Path, eval_file: Path, steps: int, seed: int, lr: float,
              batch_size: int):
    """Settings shared by the rm and dpo stages (RMConfig / DPOConfig share these sections)."""
    cfg.data.train_file = str(train_file)
    cfg.data.eval_file = str(eval_file)
    cfg.data.max_length = 256
    # one pass over the first steps x batch records: reading, tokenizing (and for DPO the
    # reference pass over) all 6,000 images' preferences would cost more than the training
    cfg.data.max_train_samples = steps * batch_size
    cfg.train.output_dir = str(out / name)
    cfg.train.max_steps = steps
    cfg.train.batch_size = batch_size
    cfg.train.seed = seed
    cfg.train.log_every = 5
    cfg.train.eval_every = max(steps // 5, 1)
    cfg.train.keep_last = 1
    cfg.optim.lr = lr
    cfg.optim.warmup_ratio = 0.1
    cfg.optim.weight_decay = 0.0
    return cfg


def rm_stage_config(out: Path, data_dir: Path, steps: int, seed: int, *, lists: bool = RM_LISTS,
                    lora: bool = RM_LORA, lr: float = RM_LR, batch_size: int = PREF_BATCH):
    """The reward-model stage: ranked caption lists (``lists``) or the hallucination pairs,
    held-out accuracy on ``dpo_eval.json`` (the pairs the dpo stage is measured on)."""
    from .methods.rm import RMConfig
    train = data_dir / ("ranked_train.json" if lists else "dpo_train.json")
    cfg = _pref_cfg(RMConfig(), out, "rm", train, data_dir / "dpo_eval.json", steps, seed, lr, batch_size)
    cfg.model.train_vision = False   # frozen in SFT too
    cfg.model.train_projector = not lora
    cfg.model.train_language = True
    cfg.lora.enabled = lora
    return cfg


def dpo_stage_config(out: Path, data_dir: Path, steps: int, seed: int, *, lora: bool = DPO_LORA,
                     lr: float = DPO_LR, beta: float = DPO_BETA, batch_size: int = PREF_BATCH):
    """The DPO stage: ``dpo_train.json`` (a wrong colour / shape / position / count, in a short
    answer or a caption), the starting model as the reference, its log-probs computed once."""
    from .methods.dpo import dpo_config
    cfg = _pref_cfg(dpo_config(), out, "dpo", data_dir / "dpo_train.json", data_dir / "dpo_eval.json", steps,
                    seed, lr, batch_size)
    cfg.lora.enabled = lora
    cfg.dpo.beta = beta
    cfg.dpo.precompute_ref_logps = True
    cfg.dpo.ref_cache_dir = str(out / "ref_cache")
    return cfg


def train_rm_stage(adapter, cfg) -> tuple[dict, object]:
    """Train a reward model on a COPY of ``adapter``'s model (the policy stays as it is)."""
    from .methods.rm import train_rm
    rm_adapter = type(adapter)(copy.deepcopy(adapter.model), adapter.processor)
    result, rm = train_rm(cfg, adapter=rm_adapter)
    r = result.metrics
    m = {"rm_accuracy": r["eval/accuracy"], "rm_margin": r["eval/margin"], "rm_loss": r["eval/loss"],
         "train_loss": r.get("loss"), "steps": result.step}
    return m, rm


def train_dpo_stage(adapter, cfg) -> tuple[dict, object]:
    """DPO on ``adapter`` (trained in place; the reference is its state before training)."""
    from .methods.dpo import train_dpo
    result, adapter = train_dpo(cfg, adapter=adapter)
    r = result.metrics
    m = {"dpo_accuracy": r["eval/accuracy"], "dpo_margin": r["eval/margin"],
         "dpo_chosen_reward": r["eval/chosen_reward"], "dpo_rejected_reward": r["eval/rejected_reward"],
         "dpo_loss": r["eval/loss"], "train_loss": r.get("loss"), "steps": result.step}
    return m, adapter


def run_quickstart(out: str | Path = "runs/quickstart", *, family: str = "llava", seed: int = 0,
                   pretrain_steps: int = PRETRAIN_STEPS, sft_steps: int = SFT_STEPS,
                   data: ShapesConfig = DATA, quiet: bool = False, rm_steps: int = RM_STEPS,
                   dpo_steps: int = DPO_STEPS, rl: str = "grpo", rl_steps: int | None = None,
                   overwrite: bool = False) -> dict:
    """Run the stages and write ``report.json`` / ``report.md`` under ``out``. A training stage
    with ``<stage>_steps=0`` is skipped; later stages start from the model the earlier ones left
    (rm and dpo from the SFT model when it ran, the RL stage from the DPO or else the SFT model).
    ``rl``: the RL stage's method, ``grpo`` or ``ppo`` (also its name in the report);
    ``rl_steps``: its steps (default: that method's ``RL_STEPS``). An ``out`` that holds an earlier
    quickstart is refused unless ``overwrite`` (its stages' runs are then replaced).

    Each stage's ``config.yaml`` names the model it started from (``model.path``: ``base_model/``
    or the previous stage's last checkpoint), so ``vlmalign train METHOD --config`` reruns it."""
    if rl not in RL_METHODS:
        raise ValueError(f"unknown RL stage {rl!r}; choose from {', '.join(RL_METHODS)}")
    rl_steps = RL_STEPS[rl] if rl_steps is None else rl_steps
    out = Path(out)
    _claim(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    say = (lambda *a: None) if quiet else print

    say(f"[quickstart] generating ShapesWorld in {out / 'data'}")
    data_dir = out / "data"
    generate_shapesworld(data_dir, replace(data, seed=seed))
    vqa = read_file(data_dir / "vqa_eval.json", kind="rl_prompt")
    pope = read_file(data_dir / "pope_eval.json", kind="rl_prompt")

    say(f"[quickstart] building a tiny random-init {family} model")
    seed_everything(seed)
    model, processor = build_tiny(family, seed=seed, **TINY.get(family, {}))
    adapter = adapter_for(model, processor)
    start = out / "base_model"  # the model each stage's config.yaml names as model.path
    adapter.save_pretrained(str(start))
    stages = []

    def stage_cfg(cfg):
        cfg.train.progress = not quiet
        cfg.train.overwrite = overwrite
        cfg.model.path, cfg.model.tiny = str(start.resolve()), None
        return cfg

    t = time.time()
    stages.append({"name": "base", "metrics": _measure(adapter, data_dir, vqa, pope), "seconds": time.time() - t})
    say(f"[quickstart] base: vqa_accuracy={stages[-1]['metrics']['vqa_accuracy']:.3f}")

    # SFT trains projector and language model; the random-init tower stays frozen: its random
    # features keep colour and layout, and training it as well stalled learning (measured)
    plans = [("pretrain", pretrain_config(), data_dir / "captions_train.json", pretrain_steps, 2e-3, 32),
             ("sft", SFTConfig(), data_dir / "vqa_train.json", sft_steps, 1e-3, 32)]
    for name, base_cfg, train_file, steps, lr, bs in plans:
        if steps <= 0:
            continue
        say(f"[quickstart] {name}: {steps} steps on {train_file.name}")
        t = time.time()
        cfg = stage_cfg(_stage_cfg(base_cfg, out, name, train_file, steps, seed, lr, bs))
        result, adapter = train_sft(cfg, adapter=adapter)
        start = Path(result.checkpoint) / "model"
        train_s = time.time() - t
        m = _measure(adapter, data_dir, vqa, pope)
        m["train_loss"] = result.metrics.get("loss")
        m["steps"] = result.step
        stages.append({"name": name, "metrics": m, "seconds": time.time() - t, "train_seconds": train_s,
                       "run_dir": cfg.train.output_dir})
        say(f"[quickstart] {name}: vqa_accuracy={m['vqa_accuracy']:.3f} ({time.time() - t:.0f}s)")

    if rm_steps > 0:
        cfg = stage_cfg(rm_stage_config(out, data_dir, rm_steps, seed))
        say(f"[quickstart] rm: {rm_steps} steps on {Path(cfg.data.train_file).name}")
        t = time.time()
        m, rm = train_rm_stage(adapter, cfg)
        del rm  # a copy: the policy the next stage trains is unchanged
        stages.append({"name": "rm", "metrics": m, "seconds": time.time() - t, "train_seconds": time.time() - t,
                       "run_dir": cfg.train.output_dir})
        say(f"[quickstart] rm: rm_accuracy={m['rm_accuracy']:.3f} ({time.time() - t:.0f}s)")

    if dpo_steps > 0:
        cfg = stage_cfg(dpo_stage_config(out, data_dir, dpo_steps, seed))
        say(f"[quickstart] dpo: {dpo_steps} steps on {Path(cfg.data.train_file).name}")
        t = time.time()
        pm, adapter = train_dpo_stage(adapter, cfg)
        start = _last_model(cfg)
        train_s = time.time() - t
        m = _measure(adapter, data_dir, vqa, pope)
        m.update(pm)
        stages.append({"name": "dpo", "metrics": m, "seconds": time.time() - t, "train_seconds": train_s,
                       "run_dir": cfg.train.output_dir})
        say(f"[quickstart] dpo: dpo_accuracy={m['dpo_accuracy']:.3f} vqa_accuracy={m['vqa_accuracy']:.3f} "
            f"({time.time() - t:.0f}s)")

    if rl_steps > 0:
        rl_dir = out / "data_rl"
        say(f"[quickstart] generating paraphrased ShapesWorld questions for {rl} in {rl_dir}")
        generate_shapesworld(rl_dir, rl_data_config(data, seed, rl_steps, RL_PROMPTS[rl]))
        cfg = stage_cfg(rl_stage_config(rl, out, rl_dir, rl_steps, seed))
        say(f"[quickstart] {rl}: {rl_steps} steps on {Path(cfg.data.train_file).name}")
        t = time.time()
        rlm, adapter = train_rl_stage(rl, adapter, cfg)
        train_s = time.time() - t
        m = _measure(adapter, data_dir, vqa, pope)
        m.update(rlm)
        stages.append({"name": rl, "metrics": m, "seconds": time.time() - t, "train_seconds": train_s,
                       "run_dir": cfg.train.output_dir})
        say(f"[quickstart] {rl}: reward {m['reward_start']:.3f} -> {m['reward']:.3f} "
            f"vqa_accuracy={m['vqa_accuracy']:.3f} ({time.time() - t:.0f}s)")

    report = {"family": family, "seed": seed, "data": str(data_dir), "stages": stages,
              "total_seconds": time.time() - t_all}
    write_json(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report, out))
    say("")
    say(render_table(report))
    say(f"\nreport: {out / 'report.json'} and {out / 'report.md'}")
    return report


def _claim(out: Path, overwrite: bool) -> None:
    from .engine.run_dir import holds_run
    from .errors import VlmalignError
    earlier = (out / "report.json").exists() or (out.is_dir() and any(holds_run(p) for p in out.iterdir()
                                                                      if p.is_dir()))
    if earlier and not overwrite:
        raise VlmalignError(f"{out} already holds a quickstart run: pass --overwrite to replace it "
                            "(overwrite=True from Python) or choose another --out")


def _last_model(cfg) -> Path:
    from .engine.checkpoint import latest_checkpoint
    return latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints") / "model"


KEY_METRICS = ("vqa_accuracy", "pope_accuracy", "pope_f1", "pope_yes_ratio", "train_loss")


def render_table(report: dict) -> str:
    head = f"{'stage':<10}" + "".join(f"{k:>16}" for k in KEY_METRICS) + f"{'seconds':>10}"
    lines = [head, "-" * len(head)]
    for s in report["stages"]:
        cells = []
        for k in KEY_METRICS:
            v = s["metrics"].get(k)
            cells.append(f"{v:>16.3f}" if isinstance(v, (int, float)) and v is not None else f"{'-':>16}")
        lines.append(f"{s['name']:<10}" + "".join(cells) + f"{s['seconds']:>10.1f}")
    pref = [s for s in report["stages"] if _pref_prefix(s)]
    if pref:
        lines += ["", "held-out preference pairs (dpo_eval.json)",
                  f"{'stage':<10}" + "".join(f"{k:>16}" for k in PREF_METRICS)]
        lines.append("-" * len(lines[-1]))
        for s in pref:
            pre = _pref_prefix(s)
            cells = [s["metrics"].get(pre + k) for k in PREF_METRICS]
            lines.append(f"{s['name']:<10}" + "".join(f"{v:>16.3f}" if isinstance(v, (int, float)) else f"{'-':>16}"
                                                      for v in cells))
    lines += rl_table(report)
    return "\n".join(lines)


PREF_METRICS = ("accuracy", "margin", "chosen_reward", "rejected_reward", "loss")
CHANGE_METRICS = ("vqa_accuracy", "pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio")


def _pref_prefix(stage: dict) -> str | None:
    """``rm_`` / ``dpo_`` for the stages measured on preference pairs, else None."""
    for pre in ("rm_", "dpo_"):
        if pre + "accuracy" in stage["metrics"]:
            return pre
    return None


def _dpo_changes(report: dict) -> list[str]:
    """Markdown rows: each VQA/POPE metric before DPO (the last stage measured on them) and after."""
    st = report["stages"]
    i = next((k for k, s in enumerate(st) if s["name"] == "dpo"), None)
    before = next((s for s in reversed(st[:i]) if "vqa_accuracy" in s["metrics"]), None) if i else None
    if before is None:
        return []
    after = st[i]["metrics"]
    rows = [f"## What DPO changed ({before['name']} -> dpo)", "", f"| metric | {before['name']} | dpo | change |",
            "|---|---|---|---|"]
    types = sorted(k for k in after if k.startswith("vqa_accuracy/"))
    for k in (*CHANGE_METRICS[:1], *types, *CHANGE_METRICS[1:]):
        a, b = before["metrics"].get(k), after.get(k)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            rows.append(f"| {k} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    return rows + [""]


def render_markdown(report: dict, out: Path) -> str:
    lines = ["# vlmalign quickstart report", "",
             f"Tiny random-init `{report['family']}` model on ShapesWorld (seed {report['seed']}); "
             f"total {report['total_seconds']:.0f} s.", "", "```", render_table(report), "```", ""]
    types = sorted({k for s in report["stages"] for k in s["metrics"] if k.startswith("vqa_accuracy/")})
    if types:
        lines += ["## VQA accuracy by question type", "",
                  "| stage | " + " | ".join(t.split("/", 1)[1] for t in types) + " |",
                  "|---|" + "---|" * len(types)]
        for s in report["stages"]:
            if "vqa_accuracy" not in s["metrics"]:
                continue  # rm: a reward model does not answer
            lines.append(f"| {s['name']} | " + " | ".join(f"{s['metrics'].get(t, float('nan')):.3f}"
                                                         for t in types) + " |")
        lines.append("")
    lines += _dpo_changes(report)
    lines += rl_markdown(report)
    for s in report["stages"]:
        png = Path(s.get("run_dir", "")) / "training.png"
        if s.get("run_dir") and png.exists():
            lines += [f"## {s['name']} training curves", "", f"![{s['name']}]({png.relative_to(out)})", ""]
    lines += ["Metric definitions: see README.md (Quickstart metrics).", ""]
    return "\n".join(lines)


def load_report(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
