"""The training methods, one table: what ``vlmalign train``, its ``--help``, the quickstart and
the docs read.

Each method is one registered file in ``methods/`` that declares ``METHODS``, a tuple of
:class:`Method`: its name, a one-line help, its config class (whose field defaults ARE the
method's defaults: nothing changes them afterwards) and its run function
``run(cfg, adapter=None, callbacks=()) -> (TrainResult, adapter)``. The step (what one
micro-batch or rollout computes) and the evaluation live in that file; pieces several methods
share have homes of their own (:mod:`.reference`, :mod:`.preference`, :mod:`.online`,
:mod:`.common`, :mod:`.logps`), and no method imports another method's file.

Adding a method: write ``methods/NAME.py`` with its config class, step, evaluation and
``METHODS``; add the module to :data:`MODULES`; document it in README's method table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

# the modules that declare METHODS, in the order `vlmalign train --help` lists them
MODULES = ("sft", "rm", "dpo", "kto", "grpo", "ppo")


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    config: type
    run: Callable

    def train(self, cfg, adapter=None, callbacks=()):
        """Check ``cfg`` (every option's declared choices and range, then the cross-option rules)
        and run it."""
        from ..config import validate_config
        if not isinstance(cfg, self.config):
            raise TypeError(f"{self.name}: expected a {self.config.__name__}, got {type(cfg).__name__}")
        validate_config(cfg)
        return self.run(cfg, adapter=adapter, callbacks=callbacks)


def methods() -> dict[str, Method]:
    """name -> :class:`Method`, in :data:`MODULES` order (the modules are imported here)."""
    out: dict[str, Method] = {}
    for mod in MODULES:
        for m in importlib.import_module(f"{__package__}.{mod}").METHODS:
            if m.name in out:
                raise RuntimeError(f"training method {m.name!r} is declared twice")
            out[m.name] = m
    return out


def get(name: str) -> Method:
    table = methods()
    if name not in table:
        import difflib
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown training method {name!r} (known: {', '.join(table)}){hint}")
    return table[name]
