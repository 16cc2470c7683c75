"""Self-critique preference generation: sample n responses per prompt, let a judge compare them
(or a reward model rank them), and write preference pairs that ``vlmalign train dpo`` reads.

    prompts = load_prompts("data/rl_train.json")
    summary = generate_preferences(adapter, prompts, ImageLoader(adapter, root), SelfCritiqueConfig(n=4),
                                   out="data/prefs.jsonl", image_root=root, judge=VLMJudge(adapter, image_root=root))

Judge mode: every pair of distinct responses (or ``max_pairs`` of them per prompt) is shown to
the judge twice, as (A, B) and as (B, A); a pair is kept only when the two verdicts name the
same response (order-consistent), which discards position bias. Reward-model mode: all
responses are scored; best vs worst (or best vs each) pairs are written, ties skipped. Counts
of everything dropped go to the summary. docs/PREFERENCE.md, "Self-critique preference
generation".
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import ConfigError, check_template, opt, validate_config
from ..data.images import resolve_image_path
from ..data.kinds import coerce
from ..data.schema import Conversation, ImageRef, ImagePart, Message, PreferencePair, RLPrompt
from ..errors import DataError

RM_PAIRS = ("best_worst", "best_each")
JUDGE_FIELDS = ("question", "response_a", "response_b", "reference")
JUDGE_TEMPLATE = (
    "You are comparing two answers to a question about the image.\n"
    "Question: {question}\n"
    "Response A: {response_a}\n"
    "Response B: {response_b}\n"
    "Which response describes the image more accurately and answers the question better? "
    "Reply with one letter: A or B.")


@dataclass
class SelfCritiqueConfig:
    """Sampling and pairing options of ``vlmalign generate-preferences`` (its flags are these)."""
    n: int = opt(4, "responses sampled per prompt", ge=2)
    temperature: float = opt(1.0, "sampling temperature (0: greedy, so all n are the same)", ge=0)
    top_p: float = opt(1.0, "nucleus sampling threshold", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling (0: off)", ge=0)
    max_new_tokens: int = opt(64, "tokens per response", ge=1)
    seed: int = opt(0, "sampling seed (and the pair-budget draw)", ge=0)
    batch_size: int = opt(8, "prompts per sampling call (images encoded once per call)", ge=1)
    max_prompt_length: int | None = opt(None, "refuse longer prompts (tokens; never cut)", ge=1)
    drop_unfinished: bool = opt(False, "drop responses that hit --max-new-tokens (counted either way)")
    max_pairs: int = opt(0, "judge mode: pairs judged per prompt, drawn with --seed (0: all n(n-1)/2)", ge=0)
    rm_pairs: str = opt("best_worst", "reward-model mode: best_worst (one pair per prompt) or best_each (the best "
                                      "against every other response)", RM_PAIRS)
    tie_margin: float = opt(0.0, "reward-model mode: score differences <= this are ties (skipped)", ge=0)

    def check(self) -> None:
        """(run by ``validate_config`` after the declared choices and ranges) counts are integers
        in a config built in Python."""
        for name in ("n", "batch_size", "max_pairs"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected an integer, got {getattr(self, name)!r}")


@dataclass
class Candidates:
    """One prompt and its distinct sampled responses (in sampling order)."""

    record: RLPrompt
    responses: list[str]
    finished: list[bool]


# ----------------------------------------------------------------------------- prompts
def as_prompt(rec) -> RLPrompt:
    """Any record -> the prompt to sample for. A conversation gives its FIRST user turn (with any
    system message before it; that is where the images of LLaVA-style data are) and its first
    answer as the reference; other kinds give their prompt (:func:`vlmalign.data.kinds.coerce`)."""
    if isinstance(rec, Conversation):
        first = next(i for i, m in enumerate(rec.messages) if m.role == "user")
        prompt = rec.messages[:first + 1]
        answer = next((m.text for m in rec.messages[first + 1:] if m.role == "assistant"), None)
        return RLPrompt(prompt, answer, source=rec.source, index=rec.index, id=rec.id, meta=dict(rec.meta))
    return coerce(rec, "rl_prompt")


def load_prompts(path, *, format: str = "auto", limit: int | None = None) -> list[RLPrompt]:
    """The prompts of a data file of any kind (RL prompts, VQA, conversations, pairs, ...)."""
    from ..data.readers import read_file
    recs = read_file(path, format=format)
    if limit is not None:
        recs = recs[:limit]
    if not recs:
        raise DataError("no records: nothing to generate preferences for", file=str(path))
    return [as_prompt(r) for r in recs]


# ----------------------------------------------------------------------------- sampling
def new_stats() -> dict[str, int]:
    """The zeroed counters that sampling, judging, ranking and writing add to (the summary's)."""
    return {k: 0 for k in ("prompts", "samples", "unique", "duplicates", "empty", "unfinished", "dropped_unfinished",
                           "prompts_without_pairs", "judged_pairs", "inconsistent", "unparsable", "ties", "pairs")}


def sample_candidates(adapter, records: Sequence[RLPrompt], loader, cfg: SelfCritiqueConfig,
                      stats: dict) -> list[Candidates]:
    """``cfg.n`` samples per prompt through :func:`vlmalign.rollout.rollout` (``cfg.batch_size``
    prompts per call, each call encoding its unique images once); identical responses (after
    stripping surrounding whitespace) are merged, empty ones dropped; both counted."""
    from ..rollout import SamplingConfig, rollout
    scfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k)
    out = []
    for c, start in enumerate(range(0, len(records), cfg.batch_size)):
        chunk = list(records[start:start + cfg.batch_size])
        batch = rollout(adapter, chunk, loader, scfg, k=cfg.n, seed=cfg.seed * 1_000_003 + c,
                        max_prompt_length=cfg.max_prompt_length)
        fin = batch.finished.tolist()
        for g, rec in enumerate(chunk):
            seen: dict[str, int] = {}
            cand = Candidates(rec, [], [])
            for r in range(g * cfg.n, (g + 1) * cfg.n):
                text, done = batch.texts[r].strip(), bool(fin[r])
                stats["samples"] += 1
                stats["unfinished"] += not done
                if not text:
                    stats["empty"] += 1
                elif not done and cfg.drop_unfinished:
                    stats["dropped_unfinished"] += 1
                elif text in seen:
                    stats["duplicates"] += 1
                else:
                    seen[text] = len(cand.responses)
                    cand.responses.append(text)
                    cand.finished.append(done)
            stats["unique"] += len(cand.responses)
            out.append(cand)
    return out


# ----------------------------------------------------------------------------- judge
_BARE = re.compile(r"^[\s\"'`*.:()\[\]]*([AaBb])[\s\"'`*.:()\[\]!]*$")
_LEADING = re.compile(r"^\s*[\"'`*(\[]*([AB])(?:[.,:;)\]!*]|\s+(?:is|was)\b)")
_LABELLED = re.compile(r"(?i:\b(?:response|answer|option|assistant|output))\s*\(?\s*([AB])\b|\[\[([AB])\]\]|\(([AB])\)")


def parse_verdict(text: str) -> str | None:
    """"A", "B" or None (unparsable). Rules, first match wins:

    1. the whole answer is one letter A or B (either case), maybe with quotes, brackets, ``*``,
       ``.``, ``:`` around it: ``"B"``, ``(a).``, ``**A**``;
    2. it starts with a capital A or B followed by punctuation or by "is" / "was":
       ``"A. It names the colour"``, ``"B: ..."``, ``"B is better"`` (a leading ``"A cat ..."``
       is an article, not a verdict);
    3. it names responses by label: ``Response A``, ``answer B``, ``Option (A)``, ``[[B]]``,
       ``(A)`` (capital letters); exactly one distinct letter named -> that letter, both -> None.
    """
    m = _BARE.match(text) or _LEADING.match(text)
    if m:
        return m.group(1).upper()
    named = {g for m in _LABELLED.finditer(text) for g in m.groups() if g}
    return named.pop() if len(named) == 1 else None


@dataclass
class JudgeRequest:
    record: RLPrompt
    response_a: str
    response_b: str


def judge_messages(req: JudgeRequest, template: str = JUDGE_TEMPLATE, system: str | None = None) -> list[Message]:
    """The judge's prompt for ``req``: the record's images, then ``template`` filled with
    {question} (the last user turn's text), {response_a}, {response_b} and {reference}; a
    system message first when ``system`` is given. :class:`VLMJudge` asks exactly this, and
    :mod:`vlmalign.methods.judge_sft` teaches it."""
    rec = req.record
    if "{reference}" in template and rec.reference is None:
        raise rec.error("the judge template uses {reference} but this record has no reference answer",
                        "reference")
    user = [m for m in rec.prompt if m.role == "user"]
    text = template.format(question=user[-1].text.strip(), response_a=req.response_a,
                           response_b=req.response_b, reference=rec.reference or "")
    msgs = [Message.system(system)] if system else []
    return msgs + [Message.user(*rec.images, text)]


def check_judge_template(template: str) -> None:
    check_template(template, JUDGE_FIELDS)
    for f in ("response_a", "response_b"):
        if "{" + f + "}" not in template:
            raise ConfigError(f"judge template must show both responses; {{{f}}} is missing")


class VLMJudge:
    """A VLM asked which of two responses is better: it sees the prompt's images and
    ``template`` filled with {question} (the last user turn's text), {response_a},
    {response_b} and {reference}, and answers greedily. ``__call__(requests) -> raw answers``;
    any callable with that signature can judge (tests use deterministic fakes).

    ``adapter``: a loaded adapter (the policy's own for self-judging) or a model directory.
    Requests go to :func:`vlmalign.rollout.generate` in batches of ``batch_size``; each batch
    encodes its unique images once (requests of one prompt are adjacent, so they share them).
    """

    def __init__(self, adapter, template: str | None = None, *, image_root=None, max_new_tokens: int = 8,
                 batch_size: int = 32, max_length: int | None = None, system: str | None = None,
                 trust_remote_code: bool = False, dtype=None):
        from ..data.batching import ImageLoader
        if template is not None:
            check_judge_template(template)
        if isinstance(adapter, (str, Path)):
            from ..models.peft import load_any
            adapter = load_any(str(adapter), trust_remote_code=trust_remote_code, dtype=dtype)
            adapter.model.eval()
        self.adapter = adapter
        self.template = template or JUDGE_TEMPLATE
        self.max_new_tokens, self.batch_size, self.max_length, self.system = max_new_tokens, batch_size, \
            max_length, system
        self.loader = ImageLoader(adapter, image_root)

    def messages(self, req: JudgeRequest) -> list[Message]:
        return judge_messages(req, self.template, self.system)

    @torch.no_grad()
    def __call__(self, requests: Sequence[JudgeRequest]) -> list[str]:
        from ..rollout import SamplingConfig, generate
        cfg = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0)
        out: list[str] = []
        for s in range(0, len(requests), self.batch_size):
            part = requests[s:s + self.batch_size]
            prompts = [self.messages(r) for r in part]
            try:
                texts = generate(self.adapter, prompts, self.loader, cfg, batch_size=len(prompts),
                                 max_length=self.max_length)
            except DataError as e:  # generation batches do not know records: find the one that fails
                for r, msgs in zip(part, prompts):
                    try:
                        self.adapter.tokenize_prompt(msgs, [self.loader.inputs(i) for i in r.record.images],
                                                     max_length=self.max_length)
                    except DataError as e2:
                        raise r.record.error(f"judge prompt: {e2.reason}", e2.field) from None
                raise e
            out.extend(t[0] for t in texts)
        return out


def _pairs_for(n: int, max_pairs: int, rng: random.Random) -> list[tuple[int, int]]:
    pairs = list(itertools.combinations(range(n), 2))
    if max_pairs and len(pairs) > max_pairs:
        pairs = sorted(rng.sample(pairs, max_pairs))
    return pairs


def judge_preferences(judge: Callable[[list[JudgeRequest]], list[str]], cands: Sequence[Candidates],
                      cfg: SelfCritiqueConfig, stats: dict) -> list[PreferencePair]:
    """Ask ``judge`` about each candidate pair in both orders; keep order-consistent verdicts.

    For responses (x, y): verdict v1 on (A=x, B=y) and v2 on (A=y, B=x). (v1, v2) = (A, B) keeps
    x as chosen, (B, A) keeps y; anything else (the same letter twice: position bias; an
    unparsable answer) drops the pair, counted under ``inconsistent`` (and ``unparsable``
    counts each unparsable answer).
    """
    rng = random.Random(cfg.seed)
    plan, requests = [], []
    for c in cands:
        if len(c.responses) < 2:
            stats["prompts_without_pairs"] += 1
            continue
        for i, j in _pairs_for(len(c.responses), cfg.max_pairs, rng):
            x, y = c.responses[i], c.responses[j]
            plan.append((c, i, j))
            requests += [JudgeRequest(c.record, x, y), JudgeRequest(c.record, y, x)]
    answers = list(judge(requests)) if requests else []
    if len(answers) != len(requests):
        raise RuntimeError(f"the judge returned {len(answers)} answers for {len(requests)} requests")
    pairs = []
    for k, (c, i, j) in enumerate(plan):
        a1, a2 = answers[2 * k], answers[2 * k + 1]
        v1, v2 = parse_verdict(a1), parse_verdict(a2)
        stats["judged_pairs"] += 1
        stats["unparsable"] += (v1 is None) + (v2 is None)
        if (v1, v2) == ("A", "B"):
            win, lose = i, j
        elif (v1, v2) == ("B", "A"):
            win, lose = j, i
        else:
            stats["inconsistent"] += 1
            continue
        pairs.append(_pair(c, win, lose, {"judge_answers": [a1, a2]}, stats))
    return pairs


# ----------------------------------------------------------------------------- reward model
def rank_preferences(source, cands: Sequence[Candidates], cfg: SelfCritiqueConfig,
                     stats: dict) -> tuple[list[PreferencePair], list[Conversation]]:
    """Score every response with ``source`` (e.g. a :class:`~vlmalign.rewards.RewardModelSource`:
    ``source(list[RewardInput]) -> (N,)`` scores). Pairs: the best against the worst
    (``best_worst``) or against each other response (``best_each``); a pair whose scores differ
    by <= ``tie_margin`` is a tie, skipped and counted. Also returns best-of-n conversations
    (prompt + highest-scoring response, one per prompt with two or more responses)."""
    from ..rewards import RewardInput
    inputs, owner = [], []
    for c in cands:
        if len(c.responses) < 2:
            stats["prompts_without_pairs"] += 1
            continue
        for i, resp in enumerate(c.responses):
            inputs.append(RewardInput.from_record(c.record, resp, finished=c.finished[i]))
            owner.append((c, i))
    scores = source(inputs).tolist() if inputs else []
    by: dict[int, list[tuple[int, float]]] = {}
    for (c, i), s in zip(owner, scores):
        by.setdefault(id(c), []).append((i, s))
    pairs, best = [], []
    for c in cands:
        if id(c) not in by:
            continue
        ranked = sorted(by[id(c)], key=lambda t: (-t[1], t[0]))            # best first, stable
        top, top_s = ranked[0]
        best.append(Conversation([*c.record.prompt, Message.assistant(c.responses[top])], source=c.record.source,
                                 index=c.record.index, id=c.record.id, meta={"score": top_s}))
        others = ranked[1:] if cfg.rm_pairs == "best_each" else ranked[-1:]
        for lose, s in others:
            if top_s - s <= cfg.tie_margin:
                stats["ties"] += 1
                continue
            pairs.append(_pair(c, top, lose, {"scores": [top_s, s]}, stats))
    return pairs, best


# ----------------------------------------------------------------------------- output
def _pair(c: Candidates, win: int, lose: int, extra: dict, stats: dict) -> PreferencePair:
    stats["pairs"] += 1
    rec = c.record
    meta = {"prompt_index": rec.index, **extra}
    if rec.id is not None:
        meta["prompt_id"] = rec.id
    return PreferencePair(list(rec.prompt), c.responses[win], c.responses[lose], source=rec.source, index=rec.index,
                          meta=meta)


def relocate_images(records: list, out, image_root) -> tuple[list, bool]:
    """Image paths that ``train dpo data.train_file=OUT`` resolves without further settings.

    Every path image is resolved under ``image_root`` (confined: a path escaping it raises,
    naming the record). When all of them lie inside OUT's directory (the default image root of
    a data file), paths are rewritten relative to it and the file reads as is: returns
    (records, True). Otherwise paths stay relative to ``image_root`` and training needs
    ``data.image_root=<image_root>``: returns (records, False).
    """
    out_dir = Path(os.path.abspath(out)).parent.resolve()
    root = Path(image_root if image_root is not None else os.getcwd()).resolve()
    full: dict[str, Path] = {}
    has_bytes = False
    for rec in records:
        for ref in rec.images:
            if ref.path is None:
                has_bytes = True
            elif ref.path not in full:
                try:
                    full[ref.path] = resolve_image_path(ref.path, root)
                except DataError as e:
                    raise rec.error(e.reason, "image") from None
    inside = all(out_dir in p.parents for p in full.values())
    if not inside and has_bytes:
        raise DataError(f"images given as bytes are written next to the output, but path images lie outside "
                        f"its directory {str(out_dir)!r}; write the output inside {str(root)!r}", file=str(out))
    base = out_dir if inside else root
    new = {p: Path(os.path.relpath(f, base)).as_posix() for p, f in full.items()}

    def swap(msgs):
        return [Message(m.role, [ImagePart(ImageRef(path=new[p.image.path]))
                                 if isinstance(p, ImagePart) and p.image.path is not None else p
                                 for p in m.content]) for m in msgs]

    moved = []
    for rec in records:
        if isinstance(rec, Conversation):
            moved.append(Conversation(swap(rec.messages), source=rec.source, index=rec.index, id=rec.id,
                                      meta=rec.meta))
        else:
            moved.append(PreferencePair(swap(rec.prompt), rec.chosen, rec.rejected, source=rec.source,
                                        index=rec.index, id=rec.id, meta=rec.meta))
    return moved, inside


def _write(records: list, out, image_root) -> bool:
    from ..data.writers import write_records
    moved, inside = relocate_images(records, out, image_root)
    write_records(moved, out, "vlmalign", image_dir=Path(os.path.abspath(out)).parent / "images")
    return inside


def generate_preferences(adapter, records: Sequence[RLPrompt], loader, cfg: SelfCritiqueConfig, *, out,
                         image_root=None, judge=None, reward_model=None, best_of_n_out=None,
                         summary_out=None) -> dict:
    """Sample, judge (``judge``: a :class:`VLMJudge` or any callable of :class:`JudgeRequest`
    lists) or rank (``reward_model``: a reward source), and write the pairs to ``out`` (native
    JSON Lines; image paths per :func:`relocate_images`, ``image_root`` defaulting to the
    loader's). ``best_of_n_out`` (reward-model mode): the best response per prompt as
    conversations (SFT data). ``summary_out`` (default ``<out without suffix>.summary.json``)
    gets the returned summary: counts, settings and how to train on the file."""
    validate_config(cfg)
    image_root = loader.image_root if image_root is None else image_root
    image_root = os.getcwd() if image_root is None else image_root
    if (judge is None) == (reward_model is None):
        raise ConfigError("give exactly one of a judge and a reward model")
    if best_of_n_out is not None and reward_model is None:
        raise ConfigError("best-of-n output needs a reward model (judge mode ranks no responses)")
    if not records:
        raise ConfigError("no prompts to generate preferences for")
    t0 = time.perf_counter()
    stats = new_stats()
    stats["prompts"] = len(records)
    cands = sample_candidates(adapter, records, loader, cfg, stats)
    if judge is not None:
        pairs, best = judge_preferences(judge, cands, cfg, stats), None
    else:
        pairs, best = rank_preferences(reward_model, cands, cfg, stats)
    from ..files import write_json
    if summary_out is None:
        summary_out = Path(out).with_suffix("").as_posix() + ".summary.json"
    Path(summary_out).parent.mkdir(parents=True, exist_ok=True)
    root = str(Path(image_root).resolve())
    summary = {**stats, "mode": "judge" if judge is not None else "reward_model", "out": str(out),
               "best_of_n_out": None if best_of_n_out is None else str(best_of_n_out), "image_root": root,
               "config": asdict(cfg)}
    if not pairs:
        write_json(summary_out, {**summary, "out": None, "seconds": round(time.perf_counter() - t0, 3)})
        raise DataError(f"no preference pairs were kept ({json.dumps(stats)}); sample more responses (n), raise "
                        f"the temperature, or check the judge's answers (summary: {summary_out})", file=str(out))
    inside = _write(pairs, out, image_root)
    if best_of_n_out is not None:
        _write(best, best_of_n_out, image_root)
    summary["paths_relative_to"] = "out_dir" if inside else "image_root"
    summary["train"] = f"vlmalign train dpo --config FILE data.train_file={out}" + (
        "" if inside else f" data.image_root={root}")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(summary_out, summary)
    return summary
