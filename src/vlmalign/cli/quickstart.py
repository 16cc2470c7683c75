"""`vlmalign quickstart`: the main job on the embedded default (see vlmalign.quickstart)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="run the embedded end-to-end demo offline and write a report")
    p.add_argument("--out", default="runs/quickstart", help="output directory (report.json, report.md)")
    p.add_argument("--family", default="llava", help="tiny model family to build")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..quickstart import run_quickstart
    run_quickstart(args.out, family=args.family, seed=args.seed)
    return 0
