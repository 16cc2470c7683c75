"""Reading a record as another kind (``read_file(..., kind=...)``).

Allowed conversions (everything else is a :class:`DataError` that says why):

==============  =====================================================================
to              from
==============  =====================================================================
conversation    preference (prompt + chosen), ranked (prompt + best response),
                unpaired with label true, rl_prompt with a reference answer
preference      ranked with exactly two responses (more: use ``RankedList.pairs()``)
ranked          preference (chosen, rejected) without rejected-side images
rl_prompt       any kind: its prompt; a conversation's last assistant turn becomes the
                reference, or, when it ends with a user turn, all of it is the prompt
                (no reference); other kinds keep no reference
==============  =====================================================================
"""

from __future__ import annotations

from .schema import (RECORD_KINDS, Conversation, Message, PreferencePair, RankedList, Record,
                     RLPrompt, UnpairedExample)


def _common(rec: Record) -> dict:
    return dict(source=rec.source, index=rec.index, id=rec.id, meta=dict(rec.meta), read_from=rec.kind,
                one_placeholder_for=rec.one_placeholder_for)


# what a conversion leaves out, said to the user when a method reads a file that way
DROPPED = {
    ("ranked", "conversation"): "trains on each list's best response (the first) only; the other "
                                "responses are not used",
    ("preference", "conversation"): "trains on each pair's chosen response only; the rejected ones are "
                                    "not used",
    ("unpaired", "conversation"): "trains on the completions labelled desirable only",
    **{(k, "rl_prompt"): "uses the prompts only: the responses are not used, and there is no reference "
                         "answer" for k in ("preference", "ranked", "unpaired")},
}


def conversion_notes(records, kind: str) -> list[str]:
    """One line per source kind whose conversion to ``kind`` left something of ``records`` out:
    how many were converted and what is not used (empty when nothing was lost)."""
    counts: dict[str, int] = {}
    for r in records:
        if (r.read_from, kind) in DROPPED:
            counts[r.read_from] = counts.get(r.read_from, 0) + 1
    return [f"{n} {src} record{'s' if n != 1 else ''} read as {kind}: {DROPPED[src, kind]}"
            for src, n in sorted(counts.items())]


def coerce(rec: Record, kind: str) -> Record:
    """Return ``rec`` as a record of ``kind``; raise ``rec.error(...)`` if that makes no sense."""
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(RECORD_KINDS)})")
    if rec.kind == kind:
        return rec
    c = _common(rec)
    if kind == "rl_prompt":
        if isinstance(rec, Conversation):
            if rec.messages[-1].role == "user":  # an unanswered last question: the prompt
                return RLPrompt(rec.messages, None, **c)
            last = max(i for i, m in enumerate(rec.messages) if m.role == "assistant")
            if last == 0:
                raise rec.error("conversation starts with the assistant turn: no prompt",
                                "messages")
            return RLPrompt(rec.messages[:last], rec.messages[last].text, **c)
        return RLPrompt(rec.prompt, None, **c)
    if kind == "conversation":
        if isinstance(rec, PreferencePair):
            return Conversation(rec.prompt + [Message.assistant(rec.chosen)], **c)
        if isinstance(rec, RankedList):
            return Conversation(rec.prompt + [Message.assistant(rec.responses[0])], **c)
        if isinstance(rec, UnpairedExample):
            if not rec.label:
                raise rec.error("an undesirable completion (label false) cannot be read as a "
                                "conversation", "label")
            return Conversation(rec.prompt + [Message.assistant(rec.completion)], **c)
        if rec.reference is None or not rec.reference.strip():
            raise rec.error("no reference answer to use as the assistant turn", "reference")
        return Conversation(rec.prompt + [Message.assistant(rec.reference)], **c)
    if kind == "preference" and isinstance(rec, RankedList):
        if len(rec.responses) != 2:
            raise rec.error(f"a ranked list with {len(rec.responses)} responses is not one "
                            "preference pair; read it as 'ranked' and expand with "
                            "RankedList.pairs()", "responses")
        return PreferencePair(rec.prompt, rec.responses[0], rec.responses[1], **c)
    if kind == "ranked" and isinstance(rec, PreferencePair):
        if rec.rejected_images is not None:
            raise rec.error("a pair with rejected-side images cannot be a ranked list",
                            "rejected_images")
        return RankedList(rec.prompt, [rec.chosen, rec.rejected], **c)
    raise rec.error(f"a {rec.kind} record cannot be read as {kind!r}", "kind")
