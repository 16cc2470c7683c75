"""The completions of one generate call, token by token: each row's text, when it is done (end
of sequence, a stop string, its own max_tokens, or its client gone), and the text handed out so
far. Passed to ``generate`` as its streamer and, through :class:`RowStop`, as a stopping criterion,
so a finished row stops (and the batch ends) without waiting for the longest one."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria

HELD = "\ufffd"   # a character whose bytes are not all generated yet: not handed out until they are


class Row:
    def __init__(self, job, index: int, tokenizer, eos: set[int]):
        self.job, self.index, self.tok, self.eos = job, index, tokenizer, eos
        self.tokens: list[int] = []
        self.text = self.sent = ""
        self.done = False

    def add(self, token: int) -> None:
        if self.job.cancelled.is_set():
            self.done = True
            return
        if token in self.eos:
            return self.close("stop")
        self.tokens.append(token)
        self.text = self.tok.decode(self.tokens, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.job.params.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self.close("stop")
        if len(self.tokens) >= self.job.params.max_tokens:
            return self.close("length")
        if self.job.stream:
            self._send(self._safe_end())

    def _safe_end(self) -> int:
        """Where the text may be handed out up to: not into a possible start of a stop string, nor
        into a character still being generated."""
        end = len(self.text.rstrip(HELD))
        for s in self.job.params.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if self.text[:end].endswith(s[:k]):
                    end -= k
                    break
        return end

    def _send(self, end: int) -> None:
        if end > len(self.sent) and self.text.startswith(self.sent):
            self.job.emit(("delta", self.index, self.text[len(self.sent):end]))
            self.sent = self.text[:end]

    def close(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if not self.job.cancelled.is_set():
            self._send(len(self.text))
            self.job.emit(("done", self.index, reason, len(self.tokens)))


class Rows:
    """The streamer of a batch: ``put`` gets the prompt first, then each step's new tokens."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            if not row.done:
                row.add(token)

    def end(self) -> None:
        for row in self.rows:   # rows that ran to the batch's max_new_tokens
            row.close("length")

    def finished(self) -> list[bool]:
        for row in self.rows:
            if row.job.cancelled.is_set():
                row.done = True
        return [row.done for row in self.rows]


class RowStop(StoppingCriteria):
    def __init__(self, rows: Rows):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor(self.rows.finished(), dtype=torch.bool, device=input_ids.device)
