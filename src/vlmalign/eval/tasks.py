"""Eval tasks: how a benchmark's items are asked, how an answer is parsed, and how it is scored.

A :class:`Task` is the benchmark's rule book; :mod:`.runner` does the asking and the files.
Scoring takes the items and one raw answer per item (``{id: text}``), so scoring a model's fresh
answers and scoring a predictions file someone else wrote (``--predictions``) is one code path.
Each task's score function is one of the pure scorers (``mme.py``, ``pope.py``, ...) whose rules
docs/EVAL.md cites.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import DataError
from .items import EvalItem

# LLaVA-1.5's evaluation prompts (llava/eval, scripts/v1_5/eval): short answers and option letters
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Task:
    name: str
    help: str
    kind: str                                      # "yes_no" | "choice" | "short" | "caption" | "mixed"
    score: Callable[[Sequence[EvalItem], Sequence[str]], dict] | None   # None: a judge scores (runner)
    parse: Callable[[EvalItem, str], Any]          # the answer as the rule reads it (None: unparsable)
    correct: Callable[[EvalItem, Any], float | None] | None = None   # per-row mark for predictions.jsonl
    # appended to the question (the benchmark's usual prompt); None: the letter instruction for
    # items with options, the short-answer one for the others (MMMU mixes both)
    instruction: str | None = SHORT
    max_new_tokens: int = 16
    expand: Callable[[list[EvalItem]], list[EvalItem]] | None = None  # e.g. MMBench's circular copies
    needs: tuple[str, ...] = ("answer",)           # item fields every item must have
    judge: str | None = None                       # "pointwise" | "pairwise": a judge model scores the answers

    def prompt(self, item: EvalItem, instruction: str | None = None) -> str:
        """The text the model is shown: hint, question, options (one per line), instruction
        (``instruction``: instead of the task's; "" for none)."""
        parts = [item.hint] if item.hint else []
        parts.append(item.question)
        if item.options:
            parts += [f"{k}. {v}" for k, v in item.options.items()]
        if instruction is None:
            instruction = self.instruction if self.instruction is not None else (LETTER if item.options else SHORT)
        if instruction and not _asks_already(item.question, instruction):
            parts.append(instruction)
        return "\n".join(parts)

    def prepare(self, items: list[EvalItem]) -> list[EvalItem]:
        """The items as asked (expanded), each checked for the fields this task needs."""
        out = self.expand(items) if self.expand else list(items)
        for it in out:
            for name in self.needs:
                value = getattr(it, name, None) if name != "objects" else it.meta.get("objects")
                if value is None or value == "" or value == []:
                    raise DataError(f"task {self.name} needs {name!r} on every item (id {it.id})",
                                    file=it.source, index=it.index, field=name)
            if self.kind == "choice" and not it.options:
                raise DataError(f"task {self.name} is multiple choice but item {it.id} has no options",
                                file=it.source, index=it.index, field="options")
        return out


def _asks_already(question: str, instruction: str) -> bool:
    """MME's questions end with "Please answer yes or no." already: no second instruction."""
    q = question.lower()
    return instruction.lower() in q or "please answer yes or no" in q


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    from ..config import ConfigError
    if name not in TASKS:
        import difflib
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown eval task {name!r}{hint}; tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def _answers(items: Sequence[EvalItem], predictions: Sequence[str]) -> None:
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")


def _label(item: EvalItem) -> str:
    a = str(item.answer).strip().lower()
    if a not in ("yes", "no"):
        raise DataError(f"a yes/no answer is needed, got {item.answer!r}", file=item.source, index=item.index,
                        field="answer")
    return a


def _letter(item: EvalItem) -> str:
    a = str(item.answer).strip().upper()
    if not item.options or a not in item.options:
        raise DataError(f"answer {item.answer!r} is not one of the options {list(item.options or {})}",
                        file=item.source, index=item.index, field="answer")
    return a


# ------------------------------------------------------------------ yes / no
def _mme_score(items, preds):
    from .mme import mme_scores
    _answers(items, preds)
    return mme_scores([{"subtask": it.category, "image": it.group or it.id, "label": _label(it), "prediction": p}
                       for it, p in zip(items, preds)])


def _pope_score(items, preds):
    from .pope import pope_scores
    _answers(items, preds)
    splits = [it.split for it in items]
    return pope_scores(list(preds), [_label(it) for it in items],
                       splits if any(s is not None for s in splits) else None)


def _mme_parse(item, text):
    from .mme import parse_mme_answer
    p = parse_mme_answer(text)
    return None if p == "other" else p


def _pope_parse(item, text):
    from .pope import parse_pope_answer
    return parse_pope_answer(text)


def _same(item, parsed) -> float | None:
    if item.answer is None:
        return None
    return float(parsed is not None and str(parsed).lower() == str(item.answer).strip().lower())


register(Task("mme", "MME: yes/no per subtask; acc, acc+ and the perception / cognition totals", "yes_no",
              _mme_score, _mme_parse, _same, instruction="Please answer yes or no.", max_new_tokens=4,
              needs=("answer", "category")))
register(Task("pope", "POPE: object existence yes/no; accuracy, precision, recall, F1, yes-ratio per split",
              "yes_no", _pope_score, _pope_parse, _same, max_new_tokens=4))


# ------------------------------------------------------------------ multiple choice
def _choice_parse(item, text):
    from .multiple_choice import extract_choice
    return extract_choice(text, item.options or {})


def _choice_correct(item, parsed):
    return None if item.answer is None else float(parsed is not None and parsed == _letter(item))


def _grouped(by: str):
    def score(items, preds):
        from .multiple_choice import extract_choice, grouped_accuracy
        _answers(items, preds)
        parsed = [extract_choice(p, it.options or {}) for it, p in zip(items, preds)]
        groups = [getattr(it, by) if by != "subject" else it.meta.get("subject", it.category) for it in items]
        return grouped_accuracy(parsed, [_letter(it) for it in items],
                                groups if all(g is not None for g in groups) else None)
    return score


CIRCULAR_OFFSET = 1_000_000   # VLMEvalKit's index step between the circular copies of a question


def circular_copies(items: list[EvalItem]) -> list[EvalItem]:
    """Every question once per circular shift of its options (MMBench CircularEval), the right
    letter moved with its option; copies share ``group`` (the question). A file that already holds
    the copies (VLMEvalKit's circular TSVs: more than one row per group) is used as it is."""
    from dataclasses import replace
    groups: dict[str, int] = {}
    for it in items:
        groups[it.group or it.id] = groups.get(it.group or it.id, 0) + 1
    if any(n > 1 for n in groups.values()):
        return list(items)
    out = []
    for it in items:
        letters = list((it.options or {}).keys())
        texts = list((it.options or {}).values())
        right = _letter(it) if it.answer is not None else None
        for k in range(len(letters)):
            shifted = texts[k:] + texts[:k]
            opts = dict(zip(letters, shifted))
            ans = None if right is None else letters[(letters.index(right) - k) % len(letters)]
            out.append(replace(it, id=it.id if k == 0 else f"{it.id}+{k}", options=opts, answer=ans,
                               group=it.group or it.id, meta={**it.meta, "rotation": k}))
    return out


def _circular_score(items, preds):
    from .multiple_choice import circular_eval, extract_choice
    _answers(items, preds)
    return circular_eval([{"question_id": it.group or it.id, "prediction": extract_choice(p, it.options or {}),
                           "answer": _letter(it), "category": it.category} for it, p in zip(items, preds)])


register(Task("mmbench", "MMBench: CircularEval (every rotation of the options right), per category",
              "choice", _circular_score, _choice_parse, _choice_correct, instruction=LETTER, max_new_tokens=8,
              expand=circular_copies))
register(Task("mmbench-vanilla", "MMBench without rotations: plain accuracy per category", "choice",
              _grouped("category"), _choice_parse, _choice_correct, instruction=LETTER, max_new_tokens=8))
register(Task("seed", "SEED-Bench (image): multiple-choice accuracy per evaluation dimension", "choice",
              _grouped("category"), _choice_parse, _choice_correct, instruction=LETTER, max_new_tokens=8))
register(Task("scienceqa", "ScienceQA-IMG: multiple-choice accuracy per subject", "choice",
              _grouped("subject"), _choice_parse, _choice_correct, instruction=LETTER, max_new_tokens=8))


# ------------------------------------------------------------------ open answers
def _refs(item) -> list[str]:
    a = item.answer
    return [a] if isinstance(a, str) else list(a or [])


def _vqa_score(items, preds):
    from .vqa_soft import vqa_soft_accuracy
    _answers(items, preds)
    groups = [it.category for it in items]
    return vqa_soft_accuracy(list(preds), [_refs(it) for it in items],
                             groups if all(g is not None for g in groups) else None)


def _vqa_correct(item, parsed):
    from .vqa_soft import vqa_soft_score
    return None if item.answer is None else vqa_soft_score(parsed, _refs(item))


def _exact_score(items, preds):
    _answers(items, preds)
    out = {"accuracy": _mean([_exact(it, p) for it, p in zip(items, preds)]), "n": len(items)}
    cats = sorted({it.category for it in items if it.category is not None})
    for c in cats:
        sub = [(it, p) for it, p in zip(items, preds) if it.category == c]
        out[f"accuracy/{c}"] = _mean([_exact(it, p) for it, p in sub])
        out[f"n/{c}"] = len(sub)
    return out


def _exact(item, parsed):
    from ..data.synthetic.verify import answer_matches
    return None if item.answer is None else float(answer_matches(parsed, _refs(item)))


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _text(item, text):
    return text.strip()


register(Task("vqav2", "VQAv2-style open answers: soft accuracy over the human answers (VQAv2 normalisation)",
              "short", _vqa_score, _text, _vqa_correct))
register(Task("vqa", "open answers: exact match after normalisation (any of the references), per category",
              "short", _exact_score, _text, _exact))


def _chair_score(items, preds):
    from .chair import chair_scores, extract_objects
    _answers(items, preds)
    mentions, truth = [], []
    for it, p in zip(items, preds):
        vocab = it.meta.get("vocabulary")
        if not vocab:
            raise DataError("CHAIR needs the object vocabulary (meta 'vocabulary')", file=it.source,
                            index=it.index, field="vocabulary")
        mentions.append(extract_objects(p, vocab, it.meta.get("synonyms")))
        truth.append(it.meta["objects"])
    return chair_scores(mentions, truth, None)


register(Task("chair", "object hallucination in free-form descriptions: CHAIR_s and CHAIR_i", "caption",
              _chair_score, _text, None, instruction="", max_new_tokens=64, needs=("objects",)))


# ------------------------------------------------------------------ MMMU, MMStar, HallusionBench, captions
def _mmmu_record(it: EvalItem, pred: str) -> dict:
    qtype = it.meta.get("question_type") or ("multiple-choice" if it.options else "open")
    rec = {"question_type": qtype, "answer": it.answer, "response": pred, "id": it.id}
    if it.options:
        rec["options"] = it.options
    subject = it.meta.get("subject")
    if subject is not None:
        rec["subject"] = subject
    return rec


def _mmmu_score(items, preds):
    from .mmmu import mmmu_scores
    _answers(items, preds)
    return mmmu_scores([_mmmu_record(it, p) for it, p in zip(items, preds)])


def _mmmu_parse(item, text):
    from .mmmu import parse_mmmu_choice, parse_mmmu_open
    return parse_mmmu_choice(text, item.options) if item.options else parse_mmmu_open(text)


def _mmmu_correct(item, parsed):
    from .mmmu import mmmu_open_correct
    if item.answer is None:
        return None
    if item.options:
        return float(parsed is not None and parsed == str(item.answer).strip().upper())
    return float(mmmu_open_correct(parsed, item.answer))


def _mmstar_score(items, preds):
    from .mmmu import mmstar_scores
    _answers(items, preds)
    return mmstar_scores([{"answer": _letter(it), "category": it.category,
                           "l2_category": it.meta.get("l2-category", it.meta.get("l2_category")), "prediction": p}
                          for it, p in zip(items, preds)])


def _mmstar_parse(item, text):
    from .mmmu import parse_mmstar_answer
    return parse_mmstar_answer(text, "".join(item.options or {}))


HALLUSION_KEYS = ("subcategory", "set_id", "figure_id", "question_id")


def _hallusion_score(items, preds):
    from .hallusion import hallusion_scores
    _answers(items, preds)
    return hallusion_scores([{"category": it.category, **{k: it.meta.get(k) for k in HALLUSION_KEYS},
                              "answer": _label(it), "prediction": p} for it, p in zip(items, preds)])


def _hallusion_parse(item, text):
    from .hallusion import parse_hallusion_answer
    return parse_hallusion_answer(text)


def _caption_score(items, preds):
    from .caption import caption_scores
    _answers(items, preds)
    return caption_scores(list(preds), [_refs(it) for it in items])


register(Task("mmmu", "MMMU: multiple choice and open questions with MMMU's answer extraction, per subject",
              "mixed", _mmmu_score, _mmmu_parse, _mmmu_correct, instruction=None, max_new_tokens=32))
register(Task("mmstar", "MMStar: multiple choice (its prefix rule), per category and l2 category", "choice",
              _mmstar_score, _mmstar_parse, _choice_correct, instruction=LETTER, max_new_tokens=8,
              needs=("answer", "category")))
register(Task("hallusionbench", "HallusionBench: yes/no; question, figure and all accuracy (qAcc, fAcc, aAcc)",
              "yes_no", _hallusion_score, _hallusion_parse, _same, max_new_tokens=8, needs=("answer", "category")))
register(Task("caption", "captioning: BLEU-4, ROUGE-L and CIDEr-D against the reference captions", "caption",
              _caption_score, _text, None, instruction="", max_new_tokens=48))


# ------------------------------------------------------------------ judges (eval/judge.py)
register(Task("judge-pointwise", "a judge model scores each answer 0-100 (LLaVA-Critic style; --judge DIR)",
              "short", None, _text, None, instruction="", max_new_tokens=128, needs=(), judge="pointwise"))
register(Task("judge-pairwise", "a judge model compares two systems' answers in both orders (--judge DIR, "
              "baseline=FILE); win / tie / loss rates over order-consistent verdicts", "short", None, _text, None,
              instruction="", max_new_tokens=128, needs=(), judge="pairwise"))
