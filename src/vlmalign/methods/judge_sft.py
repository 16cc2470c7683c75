"""SFT data that teaches a model to be its own judge: preference pairs rendered as the judge
prompts of ``vlmalign generate-preferences`` (:func:`~vlmalign.methods.self_critique.judge_messages`,
the same template, image placement and system message), each pair twice, its chosen response
as A (answer "A") and as B (answer "B"), so neither letter is the likelier answer.

    records = judge_conversations(read_file("data/shapesworld/hallucination_train.json"))

``vlmalign data judge-sft`` writes them, optionally appended to an SFT mix, as one training file
(docs/PREFERENCE.md, "Self-critique pipeline").
"""

from __future__ import annotations

from typing import Sequence

from ..data.schema import Conversation, Message, PreferencePair
from ..errors import DataError
from .self_critique import JUDGE_TEMPLATE, JudgeRequest, _write, as_prompt, check_judge_template, judge_messages


def judge_conversations(pairs: Sequence[PreferencePair], template: str | None = None,
                        system: str | None = None) -> list[Conversation]:
    """Two judge conversations per pair: (A=chosen, B=rejected) -> "A", (A=rejected, B=chosen) -> "B"."""
    template = template or JUDGE_TEMPLATE
    check_judge_template(template)
    out = []
    for pair in pairs:
        if not isinstance(pair, PreferencePair):
            raise DataError(f"judge SFT data is made from preference pairs, got a {pair.kind} record",
                            file=str(pair.source))
        rec = as_prompt(pair)
        for a, b, verdict in ((pair.chosen, pair.rejected, "A"), (pair.rejected, pair.chosen, "B")):
            msgs = judge_messages(JudgeRequest(rec, a, b), template, system)
            out.append(Conversation([*msgs, Message.assistant(verdict)], source=pair.source, index=pair.index,
                                    id=f"{pair.id or pair.index}-judge-{verdict}", meta={"judge_sft": verdict}))
    return out


def write_judge_sft(pairs_file, out, *, mix=None, limit: int | None = None, image_root=None,
                    template: str | None = None, system: str | None = None) -> dict:
    """Write the judge conversations of the first ``limit`` pairs of ``pairs_file`` (after the
    records of ``mix``, an SFT file, when given) to ``out`` (native JSON Lines, image paths as
    :func:`~vlmalign.methods.self_critique.relocate_images` writes them). Returns the counts."""
    import os

    from ..data.readers import read_file
    pairs = read_file(pairs_file, kind="preference")
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        raise DataError("no preference pairs to make judge examples from", file=str(pairs_file))
    judge = judge_conversations(pairs, template, system)
    base = read_file(mix, kind="conversation") if mix is not None else []
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(pairs_file))
    inside = _write(base + judge, out, root)
    return {"pairs": len(pairs), "judge_examples": len(judge), "mix_records": len(base),
            "records": len(base) + len(judge), "out": str(out), "paths_relative_to": "out_dir" if inside else
            "image_root"}


def judge_accuracy(judge, pairs: Sequence[PreferencePair]) -> dict:
    """How a judge (a :class:`~vlmalign.methods.self_critique.VLMJudge` or any callable of
    :class:`JudgeRequest` lists) decides pairs whose answer is known: each asked in both orders,
    as ``generate-preferences`` asks. ``accuracy``: the share whose two verdicts agree and name
    the chosen response (what a kept pair would be); ``wrong``: agree on the rejected one;
    ``inconsistent``: the same letter twice or an unparsable answer (``unparsable`` counts the
    answers); ``a_share``: the share of parsable answers that are "A" (position bias)."""
    from .self_critique import parse_verdict
    requests = []
    for pair in pairs:
        rec = as_prompt(pair)
        requests += [JudgeRequest(rec, pair.chosen, pair.rejected), JudgeRequest(rec, pair.rejected, pair.chosen)]
    answers = list(judge(requests)) if requests else []
    verdicts = [parse_verdict(a) for a in answers]
    right = sum(verdicts[2 * k:2 * k + 2] == ["A", "B"] for k in range(len(pairs)))
    wrong = sum(verdicts[2 * k:2 * k + 2] == ["B", "A"] for k in range(len(pairs)))
    parsed = [v for v in verdicts if v is not None]
    n = max(len(pairs), 1)
    return {"pairs": len(pairs), "accuracy": right / n, "wrong": wrong / n,
            "inconsistent": (len(pairs) - right - wrong) / n, "unparsable": len(verdicts) - len(parsed),
            "a_share": parsed.count("A") / len(parsed) if parsed else None,
            "examples": answers[:4]}
