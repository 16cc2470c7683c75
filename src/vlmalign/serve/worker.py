"""One thread owns the model. Requests wait in a queue; the worker takes the oldest and, with it,
every waiting request that samples the same way (greedy, or the same temperature and top_p; a
request with a seed runs alone) up to ``max_batch_size`` completions, and generates them as one
left-padded batch. Tokens are handed to each request as they are generated."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..rollout.generate import SamplingConfig, generate_tokens
from .messages import Params
from .rows import Row, Rows, RowStop

log = logging.getLogger("vlmalign.serve")


class Busy(Exception):
    """The queue is full (or the server is stopping)."""


@dataclass
class Job:
    example: Any                      # rollout.generate.prompt_example
    images: dict                      # ImageRef.key() -> the image's preprocessed inputs
    params: Params
    stream: bool
    emit: Callable[[tuple], None]     # ("delta", i, text) / ("done", i, reason, tokens) / ("error", message)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def batch_key(self):
        p = self.params
        if p.seed is not None:
            return ("seed", id(self))
        return ("greedy",) if p.temperature == 0 else ("sample", p.temperature, p.top_p)


class GivenImages:
    """The loader ``generate_tokens`` needs: inputs already prepared by the request handlers."""

    def __init__(self, inputs: dict):
        self._inputs = inputs

    def inputs(self, ref):
        return self._inputs[ref.key()]


class Worker:
    def __init__(self, adapter, max_batch_size: int, max_queue: int):
        self.ad, self.max_batch_size, self.max_queue = adapter, max_batch_size, max_queue
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.stats = {"batches": 0, "completions": 0, "requests": 0}
        self._thread = threading.Thread(target=self._loop, name="vlmalign-serve-model", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise Busy("the server is stopping")
            if len(self._jobs) >= self.max_queue:
                raise Busy(f"{len(self._jobs)} requests are already waiting (--max-queue); retry later")
            self._jobs.append(job)
            self._cv.notify()

    def queued(self) -> int:
        return len(self._jobs)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def _take(self) -> list[Job] | None:
        with self._cv:
            while True:
                while self._jobs and self._jobs[0].cancelled.is_set():
                    self._jobs.popleft()
                if self._jobs or self._closed:
                    break
                self._cv.wait()
            if self._closed:
                for job in self._jobs:
                    job.emit(("error", "the server is stopping"))
                return None
            batch = [self._jobs.popleft()]
            rows, key = batch[0].params.n, batch[0].batch_key()
            for job in list(self._jobs):
                if job.batch_key() == key and rows + job.params.n <= self.max_batch_size:
                    self._jobs.remove(job)
                    batch.append(job)
                    rows += job.params.n
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except Exception as e:   # the model failed on this batch: its requests get a 500, the server goes on
                log.exception("generation failed")
                for job in batch:
                    job.emit(("error", f"generation failed ({type(e).__name__}: {e})"))

    def _run(self, batch: list[Job]) -> None:
        import torch
        from transformers import StoppingCriteriaList
        p = batch[0].params
        tok = self.ad.tokenizer
        eos = set(self.ad.stop_token_ids())
        rows = Rows([Row(job, i, tok, eos) for job in batch for i in range(job.params.n)])
        cfg = SamplingConfig(max_new_tokens=max(job.params.max_tokens for job in batch),
                             temperature=p.temperature, top_p=p.top_p)
        if p.seed is not None:
            torch.manual_seed(p.seed)
        images = GivenImages({k: v for job in batch for k, v in job.images.items()})
        generate_tokens(self.ad, [r.job.example for r in rows.rows], images, cfg, streamer=rows,
                        stopping_criteria=StoppingCriteriaList([RowStop(rows)]))
        rows.end()
        self.stats["batches"] += 1
        self.stats["completions"] += len(rows.rows)
        self.stats["requests"] += len(batch)
