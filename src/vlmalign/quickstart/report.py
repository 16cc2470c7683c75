"""The quickstart's report: the printed table and ``report.md`` (per-stage VQA / POPE metrics,
held-out preference accuracy, what DPO and the RL stage changed, training curves)."""

from __future__ import annotations

import json
from pathlib import Path

from .plan import RL_METHODS

# the keys of the RL stage's row besides the VQA / POPE metrics
GRPO_KEYS = ("reward", "reward_start", "kl", "train_reward", "train_kl", "train_loss", "steps")


KEY_METRICS = ("vqa_accuracy", "pope_f1", "pope_yes_ratio", "mmbench_accuracy", "chair_s", "chair_i",
               "train_loss")


def render_table(report: dict) -> str:
    head = f"{'stage':<10}" + "".join(f"{k:>17}" for k in KEY_METRICS) + f"{'seconds':>10}"
    lines = [head, "-" * len(head)]
    for s in report["stages"]:
        cells = []
        for k in KEY_METRICS:
            v = s["metrics"].get(k)
            cells.append(f"{v:>17.3f}" if isinstance(v, (int, float)) and v is not None else f"{'-':>17}")
        lines.append(f"{s['name']:<10}" + "".join(cells) + f"{s['seconds']:>10.1f}")
    pref = [s for s in report["stages"] if _pref_prefix(s)]
    if pref:
        lines += ["", "held-out description pairs (hallucination_eval.json)",
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
CHANGE_METRICS = ("vqa_accuracy", "pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio",
                  "pope_adversarial/f1", "mmbench_accuracy", "mmbench_vanilla_accuracy", "chair_s", "chair_i",
                  "chair_extra_i", "chair_attribute_i")


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
    lines += purposes(report)
    png = plot_hallucination(report, out / "hallucination.png")
    if png is not None:
        lines += ["## Hallucination by stage", "",
                  "CHAIR_i (hallucinated object mentions / all mentions; the part that names an object in an "
                  "empty cell: chair_extra_i) and CHAIR_s (descriptions with a hallucinated object) of greedy "
                  "descriptions of the held-out images, and POPE's yes-ratio.", "",
                  f"![hallucination by stage]({png.name})", ""]
    lines += progression(report)
    lines += _dpo_changes(report)
    lines += rl_markdown(report)
    for s in report["stages"]:
        png = Path(s.get("run_dir", "")) / "training.png"
        if s.get("run_dir") and png.exists():
            lines += [f"## {s['name']} training curves", "", f"![{s['name']}]({png.relative_to(out)})", ""]
    lines += ["Metric definitions: see README.md (Quickstart metrics).", ""]
    return "\n".join(lines)


# What each stage is for, and the metric that says whether it did it: (stage, purpose, metric, lower is better)
PURPOSES = (
    ("sft", "teach the model to answer and describe (its descriptions copy the data's hallucinations)",
     "vqa_accuracy", False),
    ("rm", "learn to tell a faithful description from a hallucinated one", "rm_accuracy", False),
    ("dpo", "cure the hallucination SFT learnt, keeping VQA and POPE", "chair_i", True),
    ("grpo", "raise the verifiable reward on questions phrased as SFT never saw", "reward", False),
    ("ppo", "raise the verifiable reward on questions phrased as SFT never saw", "reward", False),
)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def purposes(report: dict) -> list[str]:
    """Markdown: per stage what it was for, the metric that measures it before and after (the
    stage before it that was measured on the metric, or the stage's own start), and the other
    effects on hallucination (CHAIR_i) and VQA."""
    st = report["stages"]
    rows = []
    for name, purpose, key, lower in PURPOSES:
        i = next((k for k, s in enumerate(st) if s["name"] == name), None)
        if i is None:
            continue
        m = st[i]["metrics"]
        prev = next((s for s in reversed(st[:i]) if "vqa_accuracy" in s["metrics"]), None)   # the model it started from
        after = m.get(key)
        if key == "reward":
            before, where = m.get("reward_start"), "its start"
        elif key == "rm_accuracy":
            before, where = None, "held-out pairs"     # a new head: there is no before
        else:
            before, where = (prev["metrics"].get(key), prev["name"]) if prev else (None, "-")
        change = "-"
        if isinstance(before, (int, float)) and isinstance(after, (int, float)):
            better = after < before if lower else after > before
            change = f"{after - before:+.3f} ({'better' if better else 'not better'})"
        extra = []
        if name == "rm":
            extra.append(f"rank correlation of its scores with the verifier's hallucination count on the "
                         f"policy's samples: {_fmt(m.get('rm_spearman'))}")
        for k in ("chair_i", "vqa_accuracy", "pope_f1"):
            if k != key and isinstance(m.get(k), (int, float)) and prev and isinstance(prev["metrics"].get(k), (int, float)):
                extra.append(f"{k} {prev['metrics'][k]:.3f} -> {m[k]:.3f}")
        moved = f"{where} {_fmt(before)} -> {_fmt(after)}" if before is not None else f"{where}: {_fmt(after)}"
        rows.append(f"| {name} | {purpose} | {key} | {moved} | {change} | "
                    f"{'; '.join(extra) or '-'} |")
    if not rows:
        return []
    return ["## What each stage was for, and what it changed", "",
            "| stage | for | measured by | before -> after | change | also |", "|---|---|---|---|---|---|",
            *rows, ""]


def plot_hallucination(report: dict, out: Path) -> Path | None:
    """``out`` (PNG): CHAIR_i, CHAIR_s and POPE's yes-ratio per stage that describes images; None
    when fewer than two stages were measured."""
    stages = [s for s in report["stages"] if isinstance(s["metrics"].get("chair_i"), (int, float))
              and s["metrics"]["chair_i"] == s["metrics"]["chair_i"]]          # NaN: no object mentioned
    if len(stages) < 2:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [s["name"] for s in stages]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for key, label in (("chair_i", "CHAIR_i"), ("chair_extra_i", "CHAIR_i, extra objects"), ("chair_s", "CHAIR_s"),
                       ("pope_yes_ratio", "POPE yes-ratio")):
        ax.plot(names, [s["metrics"].get(key, float("nan")) for s in stages], marker="o", label=label)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("rate")
    ax.set_title("hallucination by stage (held-out images)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def progression(report: dict) -> list[str]:
    """Markdown: each benchmark metric (``vlmalign eval``'s tasks on the held-out split in
    benchmark layouts) per stage that answers, base -> ... -> rl, and the change over the run."""
    stages = [s for s in report["stages"] if "vqa_accuracy" in s["metrics"]]
    keys = [k for k in CHANGE_METRICS if any(isinstance(s["metrics"].get(k), (int, float)) for s in stages)]
    if len(stages) < 2 or not keys:
        return []
    first, last = stages[0]["name"], stages[-1]["name"]
    lines = [f"## Benchmarks by stage ({' -> '.join(s['name'] for s in stages)})", "",
             "VQA exact match, POPE (official parser), MMBench CircularEval and CHAIR on the held-out split "
             "written in benchmark layouts (`DIR/data/benchmarks/`); each stage's predictions and reports are in "
             "its run dir's `eval/` (base: `DIR/base/eval/`).", "",
             "| metric | " + " | ".join(s["name"] for s in stages) + f" | {first} -> {last} |",
             "|---|" + "---|" * (len(stages) + 1)]
    for k in keys:
        vals = [s["metrics"].get(k) for s in stages]
        cells = [f"{v:.3f}" if isinstance(v, (int, float)) else "-" for v in vals]
        a, b = vals[0], vals[-1]
        change = f"{b - a:+.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "-"
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {change} |")
    return lines + ["", "CHAIR_s / CHAIR_i: lower is better (fewer hallucinated objects).", ""]


def load_report(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def rl_curves(run_dir: str | Path) -> list[dict]:
    """The held-out measurements of an online-RL run dir, in step order: ``{"step", "reward",
    "kl"}`` (``kl`` None where it was not measured)."""
    from ..engine.run_dir import RunDir
    return [{"step": row["step"], "reward": row["eval/reward"], "kl": row.get("eval/kl")}
            for row in RunDir(run_dir).read_metrics() if "eval/reward" in row]


def rl_markdown(report: dict) -> list[str]:
    """report.md lines for the grpo stage: held-out reward from its starting model to the end,
    and the held-out reward / KL curve (one row per measurement)."""
    st = next((s for s in report["stages"] if s["name"] in RL_METHODS), None)
    if st is None:
        return []
    m = st["metrics"]
    kl = m.get("kl")
    lines = [f"## What {st['name'].upper()} changed (held-out paraphrased questions, data_rl/vqa_eval.json, "
             "greedy answers, exact-match reward)", "",
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
    lines = ["", "held-out paraphrased questions (data_rl/vqa_eval.json, greedy, exact-match reward)", head,
             "-" * len(head)]
    for s in rows:
        vals = [s["metrics"].get(c) for c in cols]
        lines.append(f"{s['name']:<10}" + "".join(f"{v:>16.4f}" if isinstance(v, (int, float)) else f"{'-':>16}"
                                                  for v in vals))
    return lines
