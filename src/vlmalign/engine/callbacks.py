"""Callbacks: code that watches a run without changing it (benchmarks, custom logging).

A callback is any object with some of the hooks below (subclassing :class:`Callback` is a
convenience, not a requirement); the engine (:mod:`.trainer`) calls those it has, in the order
the callbacks were given. ``wrap`` returns a context manager around a named part of the
run: ``step`` (one optimizer step's work) and ``reference_precompute`` (the DPO family's
reference log-prob pass before training, ``info``: ``examples``).
"""

from __future__ import annotations

import contextlib


class Callback:
    def on_train_begin(self, engine) -> None:
        """After setup and resume, before the first step."""

    def on_step_end(self, engine, metrics: dict) -> None:
        """After each optimizer step (``engine.step`` counts it) and its logging."""

    def on_train_end(self, engine, result) -> None:
        """After the final checkpoint and evaluation."""

    def wrap(self, engine, name: str, **info):
        return contextlib.nullcontext()


def notify(callbacks, hook: str, *args) -> None:
    """Call ``hook(*args)`` on every callback that has it."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


@contextlib.contextmanager
def phase(callbacks, engine, name: str, **info):
    """Every callback's ``wrap`` around the phase, the first given outermost."""
    with contextlib.ExitStack() as stack:
        for cb in callbacks:
            if hasattr(cb, "wrap"):
                stack.enter_context(cb.wrap(engine, name, **info))
        yield
