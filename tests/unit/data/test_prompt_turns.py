"""Conversations whose last user turn has no answer: the prompt for ``kind="rl_prompt"`` (PPO
prompt files leave the last gpt value empty); for SFT an empty answer is refused and a missing
one kept, warned about and counted -- never silently dropped."""

from __future__ import annotations

import pytest
from data_helpers import dump

from vlmalign.cli.main import main
from vlmalign.data import compute_stats, iter_records, read_file, validate_file
from vlmalign.errors import DataError


def h(v):
    return {"from": "human", "value": v}


def g(v):
    return {"from": "gpt", "value": v}


def roles_texts(msgs):
    return [(m.role, m.text) for m in msgs]


PPO = {"conversations": [h("Q1?"), g("")]}                      # Vision-LLM-Alignment PPO
OPEN = {"conversations": [h("Q1?"), g("A1."), h("Q2?")]}        # last question unanswered
OPEN_EMPTY = {"conversations": [h("Q1?"), g("A1."), h("Q2?"), g("")]}
PROMPT_ONLY = {"conversations": [h("Q1?")]}


@pytest.mark.parametrize("rec, prompt", [
    (PPO, [("user", "Q1?")]),
    (OPEN, [("user", "Q1?"), ("assistant", "A1."), ("user", "Q2?")]),
    (OPEN_EMPTY, [("user", "Q1?"), ("assistant", "A1."), ("user", "Q2?")]),
    (PROMPT_ONLY, [("user", "Q1?")]),
    ({"conversations": [["Q1?", "A1."], ["Q2?", ""]]},               # paddlemix pairs
     [("user", "Q1?"), ("assistant", "A1."), ("user", "Q2?")]),
    ({"messages": [{"role": "user", "content": "Q1?"}]}, [("user", "Q1?")]),   # trl
])
def test_last_user_turn_is_the_rl_prompt(tmp_path, rec, prompt):
    [r] = read_file(dump(tmp_path / "d.json", [rec]), kind="rl_prompt")
    assert r.kind == "rl_prompt" and r.reference is None
    assert roles_texts(r.prompt) == prompt


def test_answered_conversation_as_rl_prompt_keeps_its_reference(tmp_path):
    [r] = read_file(dump(tmp_path / "d.json", [{"conversations": [h("Q?"), g("A.")]}]),
                    kind="rl_prompt")
    assert (roles_texts(r.prompt), r.reference) == ([("user", "Q?")], "A.")


@pytest.mark.parametrize("kind", [None, "conversation"])
def test_empty_answer_is_still_refused_for_sft(tmp_path, kind):
    [(_, err)] = list(iter_records(dump(tmp_path / "d.json", [PPO]), kind=kind))
    assert isinstance(err, DataError)
    assert (err.index, err.field, err.reason) == (0, "conversations[1].value",
                                                  "empty or missing response")


@pytest.mark.parametrize("rec", [
    OPEN,
    {"messages": [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."},
                  {"role": "user", "content": "Q2?"}]},
    {"kind": "conversation", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Q1?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A1."}]},
        {"role": "user", "content": [{"type": "text", "text": "Q2?"}]}]},
])
def test_trailing_unanswered_user_turn_is_kept_and_counted_for_sft(tmp_path, rec, capsys):
    """Read as a conversation, nothing is dropped; validate warns, stats counts it."""
    key = "conversations" if "conversations" in rec else "messages"
    answered = dict(rec, **{key: rec[key][:2]})  # same layout, ends with the answer
    path = dump(tmp_path / "d.json", [rec, answered])
    first, _ = read_file(path)
    assert roles_texts(first.messages)[-1] == ("user", "Q2?") and len(first.messages) == 3
    report = validate_file(path)
    assert report.ok and [(w.index, w.field) for w in report.warnings] == [(0, "messages[2]")]
    assert "ends with a user turn that has no answer" in report.warnings[0].reason
    assert main(["data", "validate", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"warning: {path}: record 0: field 'messages[2]': the conversation "
                             "ends with a user turn that has no answer")
    assert "kind rl_prompt" in out[0] and out[-1] == "2 records, 0 bad, 1 with warnings"
    assert compute_stats(path)["unanswered_last_turns"] == 1
    assert validate_file(path, kind="rl_prompt").warnings == []
