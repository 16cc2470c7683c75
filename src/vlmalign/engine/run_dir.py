"""The run directory: resolved config, metrics.jsonl, checkpoints, plots, report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..config import save_config


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

    def plot(self, name: str = "training.png") -> Path | None:
        """PNG of every numeric train/eval series against step."""
        if not self.main:
            return None
        rows = self.read_metrics()
        if not rows:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            step = r.get("step")
            for k, v in r.items():
                if k in ("step", "epoch", "time", "lr") or k.endswith("items") or not isinstance(v, (int, float)):
                    continue
                if isinstance(v, float) and not math.isfinite(v):
                    continue
                series.setdefault(k, []).append((step, v))
        keys = sorted(series)
        if not keys:
            return None
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
        out = self.path / name
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out
