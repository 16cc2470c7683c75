"""`vlmalign eval`: ask a model (or read a predictions file), score by the task's rule, write a run dir.

The run dir holds ``config.yaml`` (the resolved :class:`EvalConfig`), ``predictions.jsonl`` (one
row per item, appended batch by batch: id, question as shown, prediction, parsed answer,
correct/score, reference), ``metrics.json``, ``report.md`` (headline and per-category tables,
unparsable answers shown) and ``chart.png``. Run again with the same settings, an interrupted
eval skips the items it already answered; other settings in the same dir are refused unless
``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import ConfigError, opt, save_config, validate_config
from ..files import write_json, write_lines
from ..errors import DataError, VlmalignError
from .items import EvalItem
from .tasks import Task, get_task

log = logging.getLogger("vlmalign.eval")

PREDICTIONS = "predictions.jsonl"


@dataclass
class EvalConfig:
    task: str = opt("", "benchmark task (vlmalign eval --help lists them)")
    data: str = opt("", "benchmark file or folder, in one of the layouts of eval.readers.LAYOUTS")
    layout: str = opt("auto", "file layout (auto: detected from the path and the first record)")
    answers: str | None = opt(None, "annotation file with the references (e.g. POPE's labels beside a "
                                    "LLaVA question file)")
    image_root: str | None = opt(None, "directory image paths are confined to (default: the layout's)")
    model: str | None = opt(None, "model directory (or LoRA adapter directory) that answers")
    predictions: str | None = opt(None, "score this predictions file instead of asking a model")
    out: str | None = opt(None, "run dir (default: runs/eval/<task>)")
    overwrite: bool = opt(False, "replace a run dir that holds an eval with other settings")
    mode: str = opt("generate", "multiple choice: generate and extract the letter, or rank the options by "
                                "likelihood", ("generate", "likelihood"))
    likelihood_norm: str = opt("mean", "likelihood mode: an option's log-probability summed over its "
                                       "tokens or their mean", ("mean", "sum"))
    instruction: str | None = opt(None, "text appended to every question instead of the task's (\"\": none; "
                                        "mode=likelihood appends none by default)")
    image_position: str = opt("model", "images before or after the question text; model: as the model's "
                                       "training prompts had them (its vlmalign_prompt.json), else before",
                              ("model", "before", "after"))
    batch_size: int = opt(16, "items per batch", ge=1)
    max_new_tokens: int | None = opt(None, "tokens per answer (default: the task's)", ge=1)
    limit: int | None = opt(None, "only the first N items (after expansion into rotations)", ge=1)
    vocabulary: str | None = opt(None, "chair: JSON file with the object 'vocabulary' and optional "
                                       "'synonyms' (default: the items' own)")
    judge: str | None = opt(None, "judge-pointwise / judge-pairwise: the judge model directory (a VLM, or a "
                                  "text-only causal LM with judge_text_only)")
    judge_template: str | None = opt(None, "judge prompt with {question} {answer} (pairwise: {answer_1} "
                                           "{answer_2}) {reference} {reference_line} (default: docs/EVAL.md)")
    judge_text_only: bool = opt(False, "the judge is a plain causal LM: it is shown the text, no image")
    judge_max_new_tokens: int = opt(32, "tokens of each judge reply", ge=1)
    baseline: str | None = opt(None, "judge-pairwise: the predictions file of system B (A: model or predictions)")
    dtype: str | None = opt(None, "fp32, bf16 or fp16 (default: the checkpoint's)")
    device: str | None = opt(None, "cpu, cuda, cuda:1 ... (default: cuda if present)")
    trust_remote_code: bool = opt(False, "allow custom model code")
    progress: bool = opt(True, "progress bar on a terminal (a log line every 30 s elsewhere)")

    def check(self) -> None:
        if not self.task:
            raise ConfigError("task: name a benchmark task")
        get_task(self.task)
        if bool(self.model) == bool(self.predictions):
            raise ConfigError("give exactly one of model (answer with a model) or predictions (score a file)")
        task = get_task(self.task)
        if task.judge and not self.judge:
            raise ConfigError(f"task {self.task} needs judge (the judge model directory)")
        if self.judge and not task.judge:
            raise ConfigError(f"judge is for the judge-pointwise / judge-pairwise tasks, not {self.task}")
        if task.judge == "pairwise" and not self.baseline:
            raise ConfigError("judge-pairwise needs baseline: the predictions file of the system to compare with")
        if self.judge_template:
            from .judge import check_template
            check_template(self.judge_template)
        if self.predictions and self.mode == "likelihood":
            raise ConfigError("mode=likelihood ranks options with a model: it cannot score a predictions file")

    def same_run(self) -> dict:
        """The settings that make two evals the same (a resumable one)."""
        keep = ("task", "data", "layout", "answers", "model", "predictions", "mode", "likelihood_norm",
                "max_new_tokens", "limit", "vocabulary", "dtype", "instruction", "image_position", "judge", "judge_template", "baseline")
        return {k: getattr(self, k) for k in keep}


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    rows: list[dict]
    out: Path | None
    items: list[EvalItem] = field(default_factory=list)


def load_items(cfg: EvalConfig, task: Task) -> tuple[list[EvalItem], str | None]:
    """The benchmark's items as this task asks them (expanded, checked, ``limit`` applied)."""
    from .readers import read_benchmark
    bench = read_benchmark(cfg.data, layout=cfg.layout, answers=cfg.answers, image_root=cfg.image_root)
    items = task.prepare(bench.items)
    if cfg.vocabulary:
        items = with_vocabulary(items, cfg.vocabulary)
    return items[:cfg.limit] if cfg.limit else items, cfg.image_root or bench.image_root


def with_vocabulary(items: list[EvalItem], path: str) -> list[EvalItem]:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the vocabulary ({e})", file=path) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("vocabulary"), list):
        raise DataError("expected {'vocabulary': [...], 'synonyms': {...}}", file=path, field="vocabulary")
    for it in items:
        it.meta.setdefault("vocabulary", spec["vocabulary"])
        it.meta.setdefault("synonyms", spec.get("synonyms") or {})
    return items


def evaluate(cfg: EvalConfig, *, adapter=None, items: Sequence[EvalItem] | None = None,
             image_root: str | None = None, write: bool = True, trained_position: str | None = None) -> EvalResult:
    """Run one eval. ``adapter``: a model already in memory (no load; training and the quickstart
    pass theirs); ``items``: already read and prepared items (else ``cfg.data`` is read);
    ``write=False`` keeps everything in memory (no run dir); ``trained_position``: where the
    in-memory model's training prompts put their images (for ``image_position=model``)."""
    if adapter is not None and not cfg.model and not cfg.predictions:
        cfg.model = "<in memory>"
    validate_config(cfg)
    task = get_task(cfg.task)
    if items is None:
        items, image_root = load_items(cfg, task)
    items = list(items)
    _unique_ids(items)
    out = Path(cfg.out or Path("runs") / "eval" / cfg.task) if write else None
    done = _claim(out, cfg) if out is not None else {}
    if cfg.predictions:
        rows = _rows_from_file(task, items, cfg.predictions, cfg.instruction)
    else:
        rows = _ask(task, items, cfg, adapter, image_root, out, done, _position(cfg, trained_position))
    preds = [r["prediction"] for r in rows]
    if task.judge:
        metrics, rows = _judged(task, cfg, items, rows, image_root)
    else:
        metrics = score(task, items, preds)
    metrics = {k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()}
    unparsable = [r for r in rows if r.get("parsed") is None and task.kind in ("yes_no", "choice", "mixed")]
    if out is not None:
        if cfg.predictions or task.judge:
            write_lines(out / PREDICTIONS, rows)
        write_json(out / "metrics.json", metrics)
        from .report import write_report
        write_report(out, cfg, metrics, rows, unparsable)
    return EvalResult(metrics, rows, out, items)


def score(task: Task, items: Sequence[EvalItem], predictions: Sequence[str]) -> dict:
    """The task's metrics; a scorer's complaint about item i (``ValueError("item i: ...")``) is
    raised naming that item's file, record and field."""
    import re
    try:
        return task.score(items, predictions)
    except ValueError as e:
        m = re.match(r"item (\d+): (.*)", str(e), re.S)
        if not m or int(m.group(1)) >= len(items):
            raise DataError(f"task {task.name}: {e}") from None
        it = items[int(m.group(1))]
        f = re.search(r"field '([^']+)'", m.group(2))
        raise DataError(f"{m.group(2)} (id {it.id})", file=it.source, index=it.index,
                        field=f.group(1) if f else None) from None


def _judged(task: Task, cfg: EvalConfig, items, rows, image_root) -> tuple[dict, list[dict]]:
    """The judge's verdicts on the answers in ``rows``: (metrics, rows with the judge's fields)."""
    from .judge import Judge
    judge = Judge.load(cfg.judge, text_only=cfg.judge_text_only, trust_remote_code=cfg.trust_remote_code,
                       dtype=cfg.dtype, device=cfg.device, image_root=image_root, batch_size=cfg.batch_size,
                       max_new_tokens=cfg.judge_max_new_tokens)
    answers = [r["prediction"] for r in rows]
    if task.judge == "pointwise":
        extra, metrics = judge.pointwise(items, answers, cfg.judge_template)
    else:
        from .readers import read_predictions
        other = read_predictions(cfg.baseline)
        missing = [it.id for it in items if it.id not in other]
        if missing:
            raise DataError(f"no baseline answer for {len(missing)} of {len(items)} items (ids "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})", file=cfg.baseline,
                            field="id")
        b = [str(other[it.id]) for it in items]
        extra, metrics = judge.pairwise(items, answers, b, cfg.judge_template)
        for e, ans in zip(extra, b):
            e["baseline"] = ans
    return metrics, [{**r, **e} for r, e in zip(rows, extra)]


def _unique_ids(items: Sequence[EvalItem]) -> None:
    seen: dict[str, EvalItem] = {}
    for it in items:
        if it.id in seen:
            raise DataError(f"id {it.id!r} is used twice (also {seen[it.id].where()})", file=it.source,
                            index=it.index, field="id")
        seen[it.id] = it


def _claim(out: Path, cfg: EvalConfig) -> dict[str, dict]:
    """The rows an earlier run of the same eval in ``out`` finished ({} for a new run dir)."""
    import yaml
    conf = out / "config.yaml"
    if conf.exists():
        earlier = yaml.safe_load(conf.read_text()) or {}
        same = all(earlier.get(k) == v for k, v in cfg.same_run().items())
        if not same and not cfg.overwrite:
            diff = [k for k, v in cfg.same_run().items() if earlier.get(k) != v]
            raise VlmalignError(f"{out} holds an eval with other settings ({', '.join(diff)}): pass "
                                "overwrite=true (--overwrite) to replace it, or choose another out")
        if not same:
            for name in (PREDICTIONS, "metrics.json", "report.md", "chart.png"):
                (out / name).unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise VlmalignError(f"{out} is not empty and holds no eval: choose another out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, conf)
    return _finished(out / PREDICTIONS) if not cfg.predictions else {}


def _finished(path: Path) -> dict[str, dict]:
    """Rows of a predictions file written by an earlier, interrupted run; a last line cut off
    mid-write is dropped (its item is asked again) and the file rewritten without it."""
    if not path.exists():
        return {}
    text = path.read_text()
    lines = text.split("\n")
    rows, bad = {}, False
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:     # the write an interruption cut
                bad = True
                continue
            raise DataError("not a JSON line (the file is not one this eval wrote)", file=str(path),
                            index=n) from None
        rows[str(row["id"])] = row
    if bad:
        write_lines(path, list(rows.values()))
    return rows


def row_of(task: Task, item: EvalItem, prompt: str, prediction: str, **extra) -> dict:
    parsed = task.parse(item, prediction)
    row = {"id": item.id, "question": prompt, "prediction": prediction, "parsed": parsed,
           "correct": task.correct(item, parsed) if task.correct else None, "answer": item.answer}
    for k in ("category", "split", "group"):
        v = getattr(item, k)
        if v is not None:
            row[k] = v
    row.update(extra)
    return row


def _rows_from_file(task: Task, items: Sequence[EvalItem], path: str, instruction: str | None = None) -> list[dict]:
    from .readers import read_predictions
    preds = read_predictions(path)
    missing = [it for it in items if it.id not in preds]
    if missing:
        show = ", ".join(it.id for it in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"no prediction for {len(missing)} of {len(items)} items (ids {show})", file=path,
                        field="id")
    extra = len(preds) - len(items)
    if extra > 0:
        log.warning("%s: %d predictions have no item in the benchmark and are not scored", path, extra)
    return [row_of(task, it, task.prompt(it, instruction), str(preds[it.id])) for it in items]


def _position(cfg: EvalConfig, trained: str | None) -> str:
    if cfg.image_position != "model":
        return cfg.image_position
    if trained in ("before", "after"):
        return trained
    if cfg.model and Path(cfg.model).is_dir():
        from ..models.prompt_layout import model_image_position
        return model_image_position(cfg.model)
    return "before"


def _ask(task: Task, items: list[EvalItem], cfg: EvalConfig, adapter, image_root, out: Path | None,
         done: dict[str, dict], position: str = "before") -> list[dict]:
    from ..data.batching import ImageLoader
    from ..progress import Progress
    from ..rollout.generate import SamplingConfig
    from .answering import batches, best_option, generate_answers, rank_options
    if adapter is None:
        adapter = load_model(cfg)
    likelihood = cfg.mode == "likelihood"
    if likelihood and task.kind != "choice":
        raise ConfigError(f"mode=likelihood ranks options: task {task.name} is not multiple choice")
    loader = ImageLoader(adapter, image_root)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens or task.max_new_tokens)
    todo = [it for it in items if it.id not in done]
    instruction = cfg.instruction if cfg.instruction is not None else ("" if likelihood else None)
    if done:
        log.info("eval %s: %d of %d items already answered in %s; asking the other %d", task.name,
                 len(items) - len(todo), len(items), out, len(todo))
    bar = Progress(len(items), len(items) - len(todo), desc=f"eval {task.name}", enabled=cfg.progress,
                   unit="item")
    fresh: dict[str, dict] = {}
    sink = open(out / PREDICTIONS, "a") if out is not None else None
    try:
        for batch in batches(todo, cfg.batch_size):
            prompts = [task.prompt(it, instruction) for it in batch]
            if likelihood:
                scores = rank_options(adapter, batch, prompts, loader, norm=cfg.likelihood_norm, position=position)
                rows = [row_of(task, it, p, best_option(s), option_scores=s)
                        for it, p, s in zip(batch, prompts, scores)]
            else:
                answers = generate_answers(adapter, batch, prompts, loader, sampling, position)
                rows = [row_of(task, it, p, a) for it, p, a in zip(batch, prompts, answers)]
            for r in rows:
                fresh[r["id"]] = r
            if sink is not None:
                sink.write("".join(json.dumps(r) + "\n" for r in rows))
                sink.flush()
                os.fsync(sink.fileno())
            bar.update(len(batch))
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    rows = []
    for it in items:
        r = fresh.get(it.id) or done[it.id]
        rows.append(r)
    return rows


def load_model(cfg: EvalConfig):
    import torch

    from ..models.peft import load_any
    ad = load_any(cfg.model, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype)
    dev = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ad.model.to(dev).eval()
    return ad


def headline(metrics: dict) -> dict:
    """The metrics without a ``/`` (overall numbers, not per-category ones)."""
    return {k: v for k, v in metrics.items() if "/" not in k}


__all__ = ["EvalConfig", "EvalResult", "evaluate", "load_items", "headline"]
