"""The run directory: resolved config, metrics.jsonl, checkpoints, plots, report."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

from ..config import save_config
from ..errors import VlmalignError

log = logging.getLogger(__name__)

# what a run leaves in its output_dir (base_model/, a LoRA run's in-memory base, is rewritten)
RUN_FILES = ("metrics.jsonl", "training.png", "report.md", "config.yaml")


def holds_run(path: str | os.PathLike) -> bool:
    """True when ``path`` has an earlier run's metrics or checkpoints."""
    p = Path(path)
    m = p / "metrics.jsonl"
    ck = p / "checkpoints"
    return (m.exists() and m.stat().st_size > 0) or (ck.is_dir() and any(ck.iterdir()))


def _is_main() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def claim_output_dir(train_cfg) -> None:
    """Before a run writes anything: refuse an ``output_dir`` that holds an earlier run unless
    ``train.resume`` (continue it) or ``train.overwrite`` (delete its checkpoints, metrics,
    plots and ``eval/`` run dirs first). Re-running into the same directory used to append to its metrics and replace
    its checkpoints silently. Safe to call more than once before the run starts."""
    out = Path(train_cfg.output_dir)
    if train_cfg.resume and train_cfg.overwrite:
        raise VlmalignError("train.resume=true and train.overwrite=true contradict each other: resume continues "
                            f"the run in {out}, overwrite deletes it; choose one")
    if not holds_run(out):
        return
    if train_cfg.resume:
        ck = out / "checkpoints"
        has_ckpt = ck.is_dir() and any(p.name.startswith("step-") for p in ck.iterdir())
        if not has_ckpt:
            log.warning("%s has no checkpoint to resume from: its metrics are discarded and the run starts "
                        "from step 0", out)
            if _is_main():
                (out / "metrics.jsonl").unlink(missing_ok=True)
        return
    if not train_cfg.overwrite:
        raise VlmalignError(f"{out} already holds a run (metrics.jsonl or checkpoints/): pass train.resume=true to "
                            "continue it, train.overwrite=true to delete it and start afresh, or choose another "
                            "train.output_dir")
    if _is_main():
        log.warning("train.overwrite=true: deleting the earlier run's checkpoints, metrics, plots and evals in %s",
                    out)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        shutil.rmtree(out / "eval", ignore_errors=True)   # else its eval.tasks would resume the old answers
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)


class RunDir:
    def __init__(self, path: str | os.PathLike, *, main_process: bool = True):
        self.path = Path(path)
        self.main = main_process
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def save_config(self, cfg) -> None:
        if self.main:
            save_config(cfg, self.path / "config.yaml")

    def log(self, record: dict) -> None:
        if not self.main:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v)
                 for k, v in record.items()}
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def truncate_metrics_after(self, step: int) -> None:
        """On resume: drop records logged after the checkpoint's step (they will be redone)."""
        if not self.main or not self.metrics_file.exists():
            return
        keep = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        tmp = self.metrics_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        os.replace(tmp, self.metrics_file)

    def series(self) -> dict[str, list[tuple[int, float]]]:
        """Every finite numeric series of metrics.jsonl (lr included) as (step, value) points."""
        out: dict[str, list[tuple[int, float]]] = {}
        for r in self.read_metrics():
            step = r.get("step")
            for k, v in r.items():
                if k in ("step", "epoch", "time") or k.endswith("items") or isinstance(v, bool) \
                        or not isinstance(v, (int, float)):
                    continue
                if isinstance(v, float) and not math.isfinite(v):
                    continue
                out.setdefault(k, []).append((step, v))
        return out

    @staticmethod
    def is_curve(points: list[tuple[int, float]]) -> bool:
        """A series worth a panel: two or more steps and not one constant value."""
        return len({s for s, _ in points}) >= 2 and len({v for _, v in points}) >= 2

    def plot(self, name: str = "training.png") -> Path | None:
        """PNG of the series that are curves (several steps, changing values), and ``report.md``
        with every series' last value: single-point metrics (the final evaluation) and constant
        ones appear only there."""
        if not self.main:
            return None
        series = self.series()
        if not series:
            return None
        keys = sorted(k for k, pts in series.items() if self.is_curve(pts))
        out = self.path / name if keys else None
        if keys:
            _draw(series, keys, out)
        self.write_report(series, keys, out)
        return out

    def write_report(self, series: dict, curves: list[str], png: Path | None) -> Path:
        lines = [f"# Run report: {self.path.name}", ""]
        if png is not None:
            lines += [f"![training curves]({png.name})", "", f"Curves: {', '.join(curves)}.", ""]
        lines += ["| metric | last value | at step | points |", "|---|---|---|---|"]
        for k in sorted(series):
            step, v = series[k][-1]
            note = "" if k in curves else (" (constant)" if len(series[k]) > 1 else "")
            lines.append(f"| {k} | {v:.6g}{note} | {step} | {len(series[k])} |")
        out = self.path / "report.md"
        out.write_text("\n".join(lines) + "\n")
        return out


def _draw(series: dict, keys: list[str], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        xs, ys = zip(*series[k])
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
