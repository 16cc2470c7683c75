"""The step loop both trainers share: progress, periodic checkpoints, and stopping on a signal.

``run_steps`` calls ``one_step()`` until ``loop.step`` reaches ``loop.total_steps``; after each
step it updates the progress display, checkpoints every ``train.save_every`` steps and, when a
SIGINT / SIGTERM arrived (on any process), saves and raises :class:`TrainingInterrupted`
(:mod:`.interrupt`). A second signal abandons the step in flight without saving.
"""

from __future__ import annotations

from typing import Callable

import torch

from .interrupt import StopSignals, TrainingInterrupted, resume_hint
from ..progress import Progress


def run_steps(loop, tc, *, one_step: Callable[[], dict], postfix: Callable[[dict], dict], save: Callable[[], str],
              last_checkpoint: Callable[[], str], desc: str) -> dict:
    """Run the remaining steps; returns the last step's metrics."""
    prog = Progress(loop.total_steps, loop.step, desc=desc, bar=tc.progress, seconds=tc.progress_seconds,
                    enabled=loop.acc.is_main_process)
    last: dict = {}
    with StopSignals() as stop:
        try:
            while loop.step < loop.total_steps:
                last = one_step()
                prog.update(1, **postfix(last))
                if tc.save_every and loop.step % tc.save_every == 0 and loop.step < loop.total_steps:
                    save()
                flag = torch.tensor([1.0 if stop.requested else 0.0], device=loop.acc.device)
                # reduced over processes, so that every rank stops after the same step
                if loop._reduce(flag).item() > 0 and loop.step < loop.total_steps:
                    prog.close()
                    ckpt = save()
                    loop.run.plot()
                    raise TrainingInterrupted(
                        f"stopped by {stop.name()} after step {loop.step} of {loop.total_steps}; checkpoint "
                        f"written to {ckpt}; {resume_hint(tc.output_dir)}", stop.signum)
        except KeyboardInterrupt:
            prog.close()
            raise TrainingInterrupted(
                f"stopped at once by a second {stop.name()} during step {loop.step + 1}: that step was abandoned "
                f"and nothing new was saved; last checkpoint: {last_checkpoint()}; {resume_hint(tc.output_dir)}",
                stop.signum or 2) from None
    prog.close()
    return last


def final_evaluation(evaluate: Callable[[int], dict], step: int, ckpt: str | None, log) -> dict:
    """``eval/...`` metrics of the end-of-run evaluation, which runs after the final save: when it
    fails, the error is raised and the log says where the trained weights are."""
    try:
        return {f"eval/{k}": v for k, v in evaluate(step).items()}
    except Exception:
        log.error("the final evaluation failed; the trained weights are saved in %s", ckpt)
        raise
