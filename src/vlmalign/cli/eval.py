"""`vlmalign eval`: score a model or a predictions file on a benchmark; `vlmalign eval compare RUN...`."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from .args import config_flags

# EvalConfig options that are flags; the others are key=value overrides
FLAGS = ("task", "data", "layout", "answers", "image_root", "model", "predictions", "out", "overwrite", "mode",
         "batch_size", "max_new_tokens", "limit", "vocabulary", "judge", "baseline", "dtype", "device",
         "trust_remote_code")


def register(sub) -> None:
    from ..config import describe
    from ..eval.runner import EvalConfig
    from ..eval.tasks import TASKS
    tasks = "\n".join(f"  {name:18s} {t.help}" for name, t in sorted(TASKS.items()))
    p = sub.add_parser(
        "eval", help="evaluate a model (or a predictions file) on a benchmark; 'eval compare RUN...' tables runs",
        description="vlmalign eval --task TASK --data PATH (--model DIR | --predictions FILE) [key=value ...]\n"
                    "vlmalign eval compare RUN_DIR RUN_DIR ... [--json FILE]\n\ntasks:\n" + tasks,
        epilog="options (key = default: help):\n" + "\n".join(describe(EvalConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    config_flags(p, EvalConfig, FLAGS)
    p.add_argument("--json", help="eval compare: also write the table as JSON here")
    p.add_argument("rest", nargs="*", metavar="key=value",
                   help="EvalConfig overrides (e.g. likelihood_norm=sum), or 'compare RUN_DIR...'")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.rest and args.rest[0] == "compare":
        return _compare(args.rest[1:], args.json)
    from ..config import load_config
    from ..eval.runner import EvalConfig, evaluate, headline
    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig) if f.name in FLAGS})
    cfg = load_config(EvalConfig, None, args.rest, base=cfg)
    result = evaluate(cfg)
    for k, v in headline(result.metrics).items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"wrote {result.out}/predictions.jsonl, metrics.json, report.md")
    return 0


def _compare(dirs: list[str], out_json: str | None) -> int:
    from ..errors import VlmalignError
    from ..eval.report import compare, compare_markdown
    if len(dirs) < 1:
        raise VlmalignError("eval compare needs one or more eval run dirs")
    result = compare(dirs)
    print(compare_markdown(result))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
