"""`vlmalign train METHOD --config FILE [key=value ...]`: every method of the registry
(:mod:`vlmalign.methods.registry`), its options and defaults read from its config class."""

from __future__ import annotations

import argparse

from ..config import describe, load_config



def _registry():
    from ..methods.registry import methods
    return methods()


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model with a recipe")
    tsub = p.add_subparsers(dest="method", metavar="METHOD")
    tsub.required = True
    for name, m in _registry().items():
        sp = tsub.add_parser(name, help=m.help, formatter_class=argparse.RawDescriptionHelpFormatter,
                             description=f"{m.help}\n\noverrides: key=value with dotted keys, e.g. "
                                         "optim.lr=1e-4 train.max_steps=100",
                             epilog="options (key = default: help):\n" + "\n".join(describe(m.config)))
        sp.add_argument("--config", help="YAML recipe (defaults apply to keys it leaves out)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        sp.set_defaults(func=_run)


def _run(args) -> int:
    m = _registry()[args.method]
    cfg = load_config(m.config, args.config, args.overrides)
    result, _ = m.train(cfg)
    print(f"done: {result.step} steps; checkpoint {result.checkpoint}")
    for k, v in sorted(result.metrics.items()):
        if isinstance(v, float):
            print(f"  {k}: {v:.4f}")
    return 0
