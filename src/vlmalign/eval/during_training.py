"""Benchmark evals during training: ``eval.tasks`` in any policy-training config.

    eval:
      every: 50
      tasks:
        - {task: pope, data: data/pope.jsonl}
        - {task: mmbench, data: data/mmbench.tsv, limit: 200, name: mmb}

Each entry takes the keys of :class:`~.runner.EvalConfig` (no ``model``: the model is the one
in memory, never loaded a second time) plus an optional ``name``. The files are read and checked
when training starts, so a bad file stops the run before its first step. The evals run every
``every`` steps (0: none before the end) and after the last step;
their metrics are logged as ``eval/<name>/<metric>`` beside the training curves, and each
eval's predictions, metrics and report go to ``<output_dir>/eval/step-<N>/<name>/``.

The hooks follow the engine's callback protocol (:mod:`vlmalign.engine.callbacks`); the engine
adds this callback to any run whose config names tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

from ..config import ConfigError, opt

log = logging.getLogger("vlmalign.eval")

# EvalConfig keys an entry may not set: the model and where results go belong to the run
RUN_OWNED = ("model", "predictions", "out", "overwrite", "dtype", "device", "trust_remote_code", "progress")


@dataclass
class EvalTasksSection:
    tasks: list = opt([], "benchmark evals on the model in memory: a list of {task, data, [answers, layout, "
                          "image_root, limit, mode, batch_size, max_new_tokens, name]} (vlmalign eval's keys)")
    every: int = opt(0, "run the tasks every N steps as well as after the last one (0: after the last only)", ge=0)

    def check(self) -> None:
        names = set()
        for i, entry in enumerate(self.tasks):
            name, _ = entry_config(entry, i)
            if name in names:
                raise ConfigError(f"eval.tasks[{i}]: name {name!r} is used twice; give each entry its own name")
            names.add(name)


def entry_config(entry, i: int):
    """(name, EvalConfig) of one ``eval.tasks`` entry, checked."""
    from ..config import validate_config
    from .runner import EvalConfig
    where = f"eval.tasks[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping like {{task: pope, data: FILE}}, got {entry!r}")
    entry = dict(entry)
    name = str(entry.pop("name", entry.get("task", "")))
    allowed = [f.name for f in fields(EvalConfig) if f.name not in RUN_OWNED]
    for k in entry:
        if k not in allowed:
            import difflib
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            owned = " (the run's own model is evaluated)" if k in RUN_OWNED else ""
            raise ConfigError(f"{where}: unknown key {k!r}{hint}{owned}; keys: {', '.join(allowed)}, name")
    for k in ("task", "data"):
        if not entry.get(k):
            raise ConfigError(f"{where}: {k} is required")
    from ..config import parse_option
    cfg = EvalConfig(model="<in memory>", progress=False)
    for k, v in entry.items():
        setattr(cfg, k, parse_option(EvalConfig, k, v, where=f"{where}.{k}"))
    validate_config(cfg)
    return name, cfg


class TaskEvals:
    """The callback that runs a config's ``eval.tasks`` (module docstring)."""

    def __init__(self, section: EvalTasksSection):
        self.entries = [entry_config(e, i) for i, e in enumerate(section.tasks)]
        self.every = section.every
        self.prepared: list = []

    def prepare(self) -> None:
        """Read and check every entry's items (once: each evaluation reuses them)."""
        from .runner import load_items
        from .tasks import get_task
        self.prepared = []
        for name, cfg in self.entries:
            items, root = load_items(cfg, get_task(cfg.task))
            self.prepared.append((name, cfg, items, root))
            log.info("eval.tasks: %s: %d items of %s", name, len(items), cfg.data)

    def on_train_begin(self, engine) -> None:
        self.prepare()

    def on_step_end(self, engine, metrics: dict) -> None:
        if self.every and engine.step % self.every == 0 and engine.step < engine.total_steps:
            self.run(engine)

    def on_train_end(self, engine, result) -> None:
        result.metrics.update(self.run(engine))

    def measure(self, adapter, out: Path | None, trained_position: str | None = None) -> dict:
        """Every entry on ``adapter``: ``{"eval/<name>/<metric>": value}``, each eval's run dir
        ``out/<name>`` (``out=None``: nothing written)."""
        from dataclasses import replace

        from .runner import evaluate
        metrics: dict = {}
        for name, cfg, items, root in self.prepared:
            run_cfg = replace(cfg, out=None if out is None else str(out / name), overwrite=True)
            res = evaluate(run_cfg, adapter=adapter, items=items, image_root=root, write=out is not None,
                           trained_position=trained_position)
            metrics.update({f"eval/{name}/{k}": v for k, v in res.metrics.items() if isinstance(v, (int, float))})
        return metrics

    def run(self, engine) -> dict:
        out = Path(engine.tc.output_dir) / "eval" / f"step-{engine.step}" if engine.acc.is_main_process else None
        layout = engine.prompt_layout or {}
        metrics = self.measure(engine.adapters[0], out, layout.get("image_position"))
        if metrics:
            engine.run.log({"step": engine.step, **metrics})
        return metrics


def task_callbacks(cfg) -> list:
    """``[TaskEvals]`` when the config names eval tasks, else ``[]``."""
    section = getattr(cfg, "eval", None)
    if isinstance(section, EvalTasksSection) and section.tasks:
        return [TaskEvals(section)]
    return []
