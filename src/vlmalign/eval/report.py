"""An eval run's ``report.md`` and ``chart.png``, and ``vlmalign eval compare`` over run dirs.

Metric names are flat: ``accuracy`` (headline), ``accuracy/<category>`` or ``<subtask>/acc``
(per category). :func:`split_metrics` turns them into a headline table and a category x metric
table, whichever side of the ``/`` the category is on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

# metric names that come first in "<metric>/<category>" keys (the others are "<category>/<metric>")
LEADING = {"accuracy", "n", "unparsable", "vanilla_accuracy", "mean", "score"}


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def split_metrics(metrics: dict) -> tuple[dict, dict[str, dict]]:
    """(headline metrics, {category: {metric: value}})."""
    head, cats = {}, {}
    for k, v in metrics.items():
        if "/" not in k:
            head[k] = v
            continue
        a, b = k.split("/", 1)
        cat, name = (b, a) if a in LEADING else (a, b)
        cats.setdefault(cat, {})[name] = v
    return head, cats


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out


def write_report(out: Path, cfg, metrics: dict, rows: Sequence[dict], unparsable: Sequence[dict]) -> Path:
    head, cats = split_metrics(metrics)
    source = cfg.predictions or cfg.model
    lines = [f"# Eval: {cfg.task}", "", f"- data: `{cfg.data}`", f"- answers from: `{source}`",
             f"- items: {len(rows)}", f"- mode: {cfg.mode if not cfg.predictions else 'predictions file'}", ""]
    png = _chart(out, cfg.task, head, cats)
    if png is not None:
        lines += [f"![{cfg.task}]({png.name})", ""]
    lines += ["## Overall", ""] + _table(["metric", "value"], sorted(head.items())) + [""]
    if cats:
        names = sorted({n for c in cats.values() for n in c})
        lines += ["## Per category", ""]
        lines += _table(["category", *names], [[c, *(cats[c].get(n, "") for n in names)] for c in sorted(cats)])
        lines.append("")
    if unparsable:
        lines += [f"## Unparsable answers ({len(unparsable)})", "",
                  "Counted wrong, never dropped; the first ones:", ""]
        lines += _table(["id", "prediction"], [[r["id"], _cell(r["prediction"])] for r in unparsable[:20]])
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _cell(text: str, width: int = 80) -> str:
    t = str(text).replace("|", "\\|").replace("\n", " ")
    return t if len(t) <= width else t[:width - 3] + "..."


def _chart_values(head: dict, cats: dict[str, dict]) -> tuple[str, dict[str, float]]:
    """What the chart shows: the main per-category metric if there is one, else the headline."""
    for name in ("accuracy", "acc", "score", "f1", "mean"):
        vals = {c: m[name] for c, m in cats.items() if _plottable(m.get(name))}
        if len(vals) >= 1:
            return name, vals
    vals = {k: v for k, v in head.items() if _plottable(v) and not k.startswith("n") and k not in ("tp", "fp", "tn",
                                                                                                   "fn")}
    return "value", vals


def _plottable(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def _chart(out: Path, title: str, head: dict, cats: dict) -> Path | None:
    name, vals = _chart_values(head, cats)
    if not vals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted(vals)
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(keys) + 1.4))
    ax.barh(keys, [vals[k] for k in keys])
    ax.invert_yaxis()
    ax.set_xlabel(name)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out / "chart.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ compare
def compare(run_dirs: Sequence[str | Path]) -> dict:
    """Each run's metrics side by side and the difference to the first run, per metric.

    Returns ``{"runs": [{"dir", "task", "model"}...], "metrics": {name: [v per run]},
    "delta": {name: [v - first per run]}}``; a metric a run lacks is None there."""
    from ..errors import VlmalignError
    runs, values = [], []
    for d in run_dirs:
        p = Path(d)
        mfile = p / "metrics.json"
        if not mfile.exists():
            raise VlmalignError(f"{d}: no metrics.json (not a finished eval run dir)")
        try:
            values.append(json.loads(mfile.read_text()))
        except json.JSONDecodeError as e:
            raise VlmalignError(f"{mfile}: not valid JSON ({e})") from None
        info = {"dir": str(d)}
        conf = p / "config.yaml"
        if conf.exists():
            import yaml
            c = yaml.safe_load(conf.read_text()) or {}
            info.update(task=c.get("task"), model=c.get("model") or c.get("predictions"))
        runs.append(info)
    tasks = {r.get("task") for r in runs}
    names = [k for k in values[0]] + sorted({k for v in values[1:] for k in v} - set(values[0]))
    table = {k: [v.get(k) for v in values] for k in names}
    delta = {}
    for k, vs in table.items():
        first = vs[0]
        delta[k] = [(x - first) if _plottable(x) and _plottable(first) else None for x in vs]
    return {"runs": runs, "tasks": sorted(t for t in tasks if t), "metrics": table, "delta": delta}


def compare_markdown(result: dict) -> str:
    runs = result["runs"]
    labels = [f"{i}: {Path(r['dir']).name}" for i, r in enumerate(runs)]
    header = ["metric", *labels, *(f"Δ {i}-0" for i in range(1, len(runs)))]
    rows = []
    for k, vs in result["metrics"].items():
        ds = result["delta"][k][1:]
        rows.append([k, *("" if v is None else v for v in vs),
                     *("" if d is None else (f"{d:+.4g}" if isinstance(d, float) else f"{d:+d}") for d in ds)])
    lines = ["# Eval comparison", ""]
    lines += [f"- run {i}: `{r['dir']}` (task {r.get('task')}, model {r.get('model')})" for i, r in enumerate(runs)]
    if len(result["tasks"]) > 1:
        lines.append(f"- note: the runs are of different tasks ({', '.join(result['tasks'])})")
    lines += ["", *_table(header, rows), ""]
    return "\n".join(lines)
