"""The quickstart's online-RL stage (``grpo``): GRPO of the model the earlier stages left (the DPO
policy, or the SFT one when DPO is skipped) on ShapesWorld questions with verifiable answers.

* prompts: ``rl_train.json`` (one question per training image: colour, shape, count, position,
  existence) -- only the first ``steps x prompts_per_step`` are read and tokenized;
* reward: ``exact_match`` of the response against the reference answer after normalisation
  (``rewards/functions.py``), so 1 for a right answer and 0 otherwise;
* ``k`` sampled responses per prompt, group-normalised advantages (``grpo.estimator=grpo``), KL to
  the starting model (a frozen copy) with the k3 estimator in the loss;
* held-out measurement: greedy answers to every ``rl_eval.json`` prompt, mean reward, before the
  first step (``reward_start``) and after the last (``reward``), and the exact per-token
  KL(policy || start) along those answers (``kl``); the online loop also measures them every
  ``eval_every`` steps, which gives the curves in ``report.md``.

The quickstart (:mod:`vlmalign.quickstart`) adds the VQA / POPE metrics measured like every
other stage.
"""

from __future__ import annotations

from pathlib import Path

# Settings measured on the quickstart's DPO/SFT model (README, "Quickstart"): a step samples
# PROMPTS x K short answers (ShapesWorld answers are 1-3 words: MAX_NEW_TOKENS is enough for the
# answer and its end-of-turn token).
# Sweep on the default quickstart's DPO model, greedy reward on the 500 vqa_eval.json questions
# (less noisy than rl_eval.json's 100) before -> after: lr 1e-4, 120 steps 0.636 -> 0.632;
# lr 3e-4 without warm-up dropped to 0.60 in the first 10 steps and came back to 0.642 by step
# 120; lr 1e-3 fell (0.63 -> 0.58 on rl_eval); lr 3e-4 with 20 warm-up steps, 240 steps:
# 0.636 -> 0.650 (between 0.632 and 0.654 along the way). The gain is small: the SFT model's
# errors are mostly what it cannot see, which a 0/1 reward on 16 prompts a step teaches slowly.
GRPO_STEPS = 240
GRPO_PROMPTS = 16
GRPO_K = 8
GRPO_MAX_NEW_TOKENS = 5
GRPO_LR = 3e-4
GRPO_WARMUP_STEPS = 20
GRPO_KL = 0.04
GRPO_LORA = False
GRPO_EVAL_EVERY = 20
# the keys of the grpo stage's row besides the VQA / POPE metrics
GRPO_KEYS = ("reward", "reward_start", "kl", "train_reward", "train_kl", "train_loss", "steps")


def grpo_stage_config(out: Path, data_dir: Path, steps: int, seed: int, *, prompts: int = GRPO_PROMPTS,
                      k: int = GRPO_K, max_new_tokens: int = GRPO_MAX_NEW_TOKENS, lr: float = GRPO_LR,
                      kl_coef: float = GRPO_KL, lora: bool = GRPO_LORA, eval_every: int = GRPO_EVAL_EVERY):
    """The grpo stage's :class:`~vlmalign.methods.grpo.GRPOConfig`: prompts from
    ``rl_train.json``, held-out reward on ``rl_eval.json``, the run directory ``out/grpo``."""
    from .methods.grpo import grpo_config
    cfg = grpo_config()
    cfg.data.train_file = str(data_dir / "rl_train.json")
    cfg.data.eval_file = str(data_dir / "rl_eval.json")
    cfg.data.max_length = 256
    cfg.data.max_train_samples = steps * prompts   # one pass; tokenizing all 6,000 prompts would cost more
    cfg.model.train_vision = False                 # frozen in SFT too
    cfg.model.train_projector = False              # one image encoding serves sampling, reference, update
    cfg.model.train_language = True
    cfg.lora.enabled = lora
    cfg.train.output_dir = str(out / "grpo")
    cfg.train.max_steps = steps
    cfg.train.batch_size = prompts * k             # rows per forward: the whole rollout at once
    cfg.train.seed = seed
    cfg.train.log_every = 1
    cfg.train.eval_every = eval_every
    cfg.train.keep_last = 1
    cfg.rollout.prompts_per_step = prompts
    cfg.rollout.k = k
    cfg.rollout.temperature = 1.0
    cfg.rollout.max_new_tokens = max_new_tokens
    cfg.reward = [{"type": "function", "name": "exact_match", "weight": 1.0}]
    cfg.kl.coef = kl_coef
    cfg.kl.estimator = "k3"
    cfg.kl.placement = "loss"
    cfg.grpo.estimator = "grpo"
    cfg.optim.lr = lr
    cfg.optim.schedule = "constant"
    cfg.optim.warmup_ratio = 0.0
    cfg.optim.warmup_steps = min(GRPO_WARMUP_STEPS, steps // 10)   # Adam's first full-size steps cost reward
    cfg.optim.weight_decay = 0.0
    return cfg


def train_grpo_stage(adapter, cfg) -> tuple[dict, object]:
    """GRPO on ``adapter`` (trained in place; the reference is a frozen copy of its starting
    state). Returns the stage's RL metrics (``GRPO_KEYS``) and the adapter."""
    from .engine.run_dir import RunDir
    from .methods.grpo import train_grpo
    result, adapter = train_grpo(cfg, adapter=adapter)
    r = result.metrics
    rows = RunDir(cfg.train.output_dir).read_metrics()
    start = next((row for row in rows if row.get("step") == 0 and "eval/reward" in row), None)
    if start is None or "eval/reward" not in r:
        raise RuntimeError(f"{cfg.train.output_dir}: the grpo stage did not measure the held-out reward "
                           f"(data.eval_file={cfg.data.eval_file})")
    m = {"reward": r["eval/reward"], "reward_start": start["eval/reward"], "kl": r.get("eval/kl"),
         "train_reward": r.get("reward"), "train_kl": r.get("kl"), "train_loss": r.get("loss"),
         "steps": result.step}
    return m, adapter


def rl_curves(run_dir: str | Path) -> list[dict]:
    """The held-out measurements of an online-RL run dir, in step order: ``{"step", "reward",
    "kl"}`` (``kl`` None where it was not measured)."""
    from .engine.run_dir import RunDir
    return [{"step": row["step"], "reward": row["eval/reward"], "kl": row.get("eval/kl")}
            for row in RunDir(run_dir).read_metrics() if "eval/reward" in row]


def rl_markdown(report: dict) -> list[str]:
    """report.md lines for the grpo stage: held-out reward from its starting model to the end,
    and the held-out reward / KL curve (one row per measurement)."""
    st = next((s for s in report["stages"] if s["name"] == "grpo"), None)
    if st is None:
        return []
    m = st["metrics"]
    kl = m.get("kl")
    lines = ["## What GRPO changed (held-out rl_eval.json, greedy answers, exact-match reward)", "",
             f"reward {m['reward_start']:.3f} -> {m['reward']:.3f} ({m['reward'] - m['reward_start']:+.3f}) "
             f"in {m['steps']} steps; KL(policy || start) per answer token: "
             + (f"{kl:.4f}" if isinstance(kl, (int, float)) else "not measured") + ".", ""]
    run_dir = st.get("run_dir")
    curve = rl_curves(run_dir) if run_dir and Path(run_dir).exists() else []
    if curve:
        lines += ["| step | held-out reward | held-out KL |", "|---|---|---|"]
        for c in curve:
            k = f"{c['kl']:.4f}" if isinstance(c["kl"], (int, float)) else "-"
            lines.append(f"| {c['step']} | {c['reward']:.3f} | {k} |")
        lines.append("")
    return lines


def rl_table(report: dict) -> list[str]:
    """Printed-table lines for the grpo stage: held-out reward at its start and end, and the KL."""
    rows = [s for s in report["stages"] if "reward_start" in s["metrics"]]
    if not rows:
        return []
    cols = ("reward_start", "reward", "kl")
    head = f"{'stage':<10}" + "".join(f"{c:>16}" for c in cols)
    lines = ["", "held-out RL prompts (rl_eval.json, greedy, exact-match reward)", head, "-" * len(head)]
    for s in rows:
        vals = [s["metrics"].get(c) for c in cols]
        lines.append(f"{s['name']:<10}" + "".join(f"{v:>16.4f}" if isinstance(v, (int, float)) else f"{'-':>16}"
                                                  for v in vals))
    return lines
