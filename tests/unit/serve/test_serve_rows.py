"""serve/rows.py: each completion's stop strings, max_tokens, end of sequence and streamed text."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from vlmalign.serve.messages import Params
from vlmalign.serve.rows import Row, Rows, RowStop

EOS = 0


class CharTokenizer:
    """Token id = a character's code point; ``\\ufffd`` for id 1 (a character not finished yet)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\ufffd" if i == 1 else chr(i) for i in ids)


def _job(stop=(), max_tokens=50, stream=True):
    events = []
    job = SimpleNamespace(params=Params(1, 0.0, 1.0, max_tokens, list(stop)), stream=stream, emit=events.append,
                          cancelled=threading.Event())
    return job, events


def _feed(rows: Rows, steps):
    rows.put(torch.tensor([[5, 6]] * len(rows.rows)))   # the prompt: skipped
    for step in steps:
        rows.put(torch.tensor(step))
    rows.end()


def _text(events):
    return "".join(e[2] for e in events if e[0] == "delta")


def test_a_stop_string_across_tokens_is_never_sent():
    job, events = _job(stop=["END"])
    rows = Rows([Row(job, 0, CharTokenizer(), {EOS})])
    _feed(rows, [[ord(c)] for c in "abEcEN"] + [[ord("D")], [ord("z")]])
    assert _text(events) == "abEcEN"[:4] and events[-1] == ("done", 0, "stop", 7)
    assert all("EN" not in e[2] for e in events if e[0] == "delta")


def test_rows_stop_on_their_own_and_the_batch_when_all_have():
    a, ea = _job(max_tokens=2)
    b, eb = _job()
    rows = Rows([Row(a, 0, CharTokenizer(), {EOS}), Row(b, 0, CharTokenizer(), {EOS})])
    stop = RowStop(rows)
    rows.put(torch.tensor([[5], [5]]))
    rows.put(torch.tensor([ord("x"), ord("y")]))
    assert stop(torch.zeros(2, 1), None).tolist() == [False, False]
    rows.put(torch.tensor([ord("x"), EOS]))
    assert stop(torch.zeros(2, 1), None).tolist() == [True, True]
    assert ea[-1] == ("done", 0, "length", 2) and _text(ea) == "xx"
    assert eb[-1] == ("done", 0, "stop", 1) and _text(eb) == "y"


def test_unfinished_characters_wait_and_non_streamed_rows_send_once():
    job, events = _job()
    rows = Rows([Row(job, 0, CharTokenizer(), {EOS})])
    rows.put(torch.tensor([[5]]))
    rows.put(torch.tensor([ord("a")]))
    rows.put(torch.tensor([1]))
    assert _text(events) == "a"          # the unfinished character is held back
    quiet, qevents = _job(stream=False)
    _feed(Rows([Row(quiet, 0, CharTokenizer(), {EOS})]), [[ord("h")], [ord("i")], [EOS]])
    assert qevents == [("delta", 0, "hi"), ("done", 0, "stop", 2)]


def test_a_cancelled_row_stops_and_says_nothing_more():
    job, events = _job()
    rows = Rows([Row(job, 0, CharTokenizer(), {EOS})])
    rows.put(torch.tensor([[5]]))
    rows.put(torch.tensor([ord("a")]))
    job.cancelled.set()
    assert RowStop(rows)(torch.zeros(1, 1), None).tolist() == [True]
    rows.put(torch.tensor([ord("b")]))
    rows.end()
    assert events == [("delta", 0, "a")]
