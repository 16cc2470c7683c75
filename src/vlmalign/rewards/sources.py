"""Reward sources and their weighted combination.

A reward SOURCE is a callable ``source(inputs: list[RewardInput]) -> torch.Tensor`` of shape
(N,), float32, on the CPU, with a ``name`` and ``stats()`` (counters for logging):

* :class:`FunctionReward` -- a reward function (built-in or the user's ``module:function``).
* :class:`RewardModelSource` -- a trained reward model (:class:`~vlmalign.models.ScalarModel`
  directory from ``vlmalign train rm``), scored exactly as ``vlmalign score`` does
  (:func:`vlmalign.rewards.scoring.score_records`: each batch's unique images are encoded once).
* :class:`JudgeReward` -- a VLM judge shown the image, question and response, decoded greedily;
  a score (default 1-10) or yes/no is parsed from its answer; unparsable answers get
  ``default`` and are counted.
* :class:`CombinedReward` -- ``sum_s w_s * source_s``, plus every source's unweighted values.

``build_reward(specs)`` builds a :class:`CombinedReward` from recipe dicts (docs/RL.md).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import ConfigError, check_template, validate_config
from ..data.schema import Conversation, Message
from ..errors import DataError, ModelError
from ..eval.metrics import yes_no
from .functions import RewardInput, check_options, resolve_function
from .specs import JudgeSpec, ModelSpec, parse_source


def _as_scores(values, inputs: Sequence[RewardInput], name: str) -> torch.Tensor:
    """Check a source's output: N finite numbers -> float32 (N,) CPU tensor."""
    n = len(inputs)
    try:
        t = torch.as_tensor(values if torch.is_tensor(values) else list(values), dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"reward {name!r} must return {n} numbers, got {type(values).__name__} ({e})") from None
    t = t.detach().cpu()
    if t.shape != (n,):
        raise ValueError(f"reward {name!r} returned shape {tuple(t.shape)} for {n} inputs")
    bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise inputs[i].error(f"reward {name!r} returned {t[i].item()} (not finite) for this response; "
                              f"non-finite at {len(bad)} of {n} inputs", "response", i)
    return t


class RewardSource:
    """Base class: ``__call__(inputs) -> (N,) float32``; ``stats()`` -> counters to log."""

    name: str = "reward"

    def __call__(self, inputs: Sequence[RewardInput]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        return {}


class FunctionReward(RewardSource):
    """A reward function ``fn(inputs, **kwargs) -> N floats`` as a source."""

    def __init__(self, fn: Callable | str, name: str | None = None, kwargs: dict | None = None):
        if isinstance(fn, str):
            name = name or fn
            fn = resolve_function(fn)
        if not callable(fn):
            raise ConfigError(f"reward function {name!r} is not callable")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.kwargs = dict(kwargs or {})
        check_options(fn, self.name, self.kwargs)

    def __call__(self, inputs: Sequence[RewardInput]) -> torch.Tensor:
        inputs = list(inputs)
        return _as_scores(self.fn(inputs, **self.kwargs), inputs, self.name)


class RewardModelSource(RewardSource):
    """Scores from a reward model: a directory written by ``vlmalign train rm`` (or a loaded
    :class:`~vlmalign.models.ScalarModel`). The prompt + response are templated by the REWARD
    model's own adapter (it may be another family than the policy) and scored at the last
    token, in batches of ``batch_size`` whose unique images are encoded once.

    Images are read from ``image_root`` (where the prompts' relative paths point). An empty
    response cannot be templated: it gets ``empty_score`` (counted) or, when that is None,
    raises naming the record. Prompts + responses over ``max_length`` raise (never truncated).
    """

    def __init__(self, model, *, batch_size: int = ModelSpec.batch_size, max_length: int | None = ModelSpec.max_length,
                 image_root=None, device=None, dtype=None, trust_remote_code: bool = False,
                 base: str | None = ModelSpec.base, empty_score: float | None = ModelSpec.empty_score,
                 name: str = "model"):
        from ..data.batching import ImageLoader
        from ..models.scalar_head import ScalarModel, load_scalar_model
        if isinstance(model, (str, Path)):
            model = load_scalar_model(str(model), dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                      base=base)
        elif not isinstance(model, ScalarModel):
            raise ModelError(f"RewardModelSource needs a reward-model directory or a ScalarModel, got "
                             f"{type(model).__name__}")
        if model.kind != "reward":
            raise ModelError(f"RewardModelSource needs a reward model; this scalar model is a {model.kind!r} model")
        validate_config(ModelSpec(batch_size=batch_size, max_length=max_length, empty_score=empty_score, base=base))
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.empty_score = empty_score
        self.name = name
        self.loader = ImageLoader(model.adapter, image_root)
        self.scored = 0
        self.empty = 0

    @torch.no_grad()
    def __call__(self, inputs: Sequence[RewardInput]) -> torch.Tensor:
        from .scoring import score_records
        inputs = list(inputs)
        out = torch.zeros(len(inputs), dtype=torch.float32)
        records, where = [], []
        for i, inp in enumerate(inputs):
            if not inp.response.strip():
                if self.empty_score is None:
                    raise inp.error("empty response: a reward model cannot score it; set empty_score for the "
                                    f"model source {self.name!r}", "response", i)
                out[i] = float(self.empty_score)
                self.empty += 1
                continue
            src, idx = inp.source, inp.index
            if src is None and idx is None:   # errors then name the position in this batch
                src, idx = "reward batch", i
            records.append(Conversation([*inp.prompt, Message.assistant(inp.response)], source=src, index=idx))
            where.append(i)
        if records:
            try:
                rows = list(score_records(self.model, records, self.loader, batch_size=self.batch_size,
                                          max_length=self.max_length))
            except DataError as e:
                raise DataError(f"reward model {self.name!r}: {e.reason}", file=e.file, index=e.index,
                                field=e.field) from None
            if len(rows) != len(records):  # one candidate per conversation; never silently short
                raise RuntimeError(f"reward model {self.name!r} scored {len(rows)} of {len(records)} responses")
            for i, row in zip(where, rows):
                out[i] = row["score"]
        self.scored += len(inputs)
        return _as_scores(out, inputs, self.name)

    def stats(self) -> dict[str, float]:
        return {"scored": float(self.scored), "empty": float(self.empty)}


# ----------------------------------------------------------------------------- judge
SCORE_TEMPLATE = (
    "You are grading an answer to a question about the image.\n"
    "Question: {question}\n"
    "Answer: {response}\n"
    "Rate how correct and helpful the answer is on a scale from 1 to 10. Reply with the number only.")
SCORE_TEMPLATE_WITH_REFERENCE = (
    "You are grading an answer to a question about the image.\n"
    "Question: {question}\n"
    "Reference answer: {reference}\n"
    "Answer: {response}\n"
    "Rate how correct the answer is compared with the reference, on a scale from 1 to 10. "
    "Reply with the number only.")
YES_NO_TEMPLATE = (
    "Question about the image: {question}\n"
    "Proposed answer: {response}\n"
    "Is the proposed answer correct? Reply yes or no.")
YES_NO_TEMPLATE_WITH_REFERENCE = (
    "Question about the image: {question}\n"
    "Reference answer: {reference}\n"
    "Proposed answer: {response}\n"
    "Does the proposed answer agree with the reference? Reply yes or no.")
_FIELDS = ("question", "response", "reference")

_NUMBER = r"(\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?"
_LABELLED = re.compile(r"\b(?:score|rating|grade)\b\s*(?:is|of)?\s*[:=]?\s*" + _NUMBER, re.IGNORECASE)
_ANY_NUMBER = re.compile(r"(?<![\d.])" + _NUMBER)


def parse_score(text: str, low: float = 1, high: float = 10) -> float | None:
    """The score a judge's answer gives, or None. Rules:

    1. a number after "score", "rating" or "grade" ("Score: 7", "rating of 8.5") wins;
    2. otherwise the first number in the text ("7", "I'd say 6 because ...");
    3. "a/b" with b != high is rescaled to a * high / b ("4/5" on a 1-10 scale is 8);
       "a/high" is a;
    4. a value outside [low, high] is unparsable (None).
    """
    m = _LABELLED.search(text) or _ANY_NUMBER.search(text)
    if m is None:
        return None
    v = float(m.group(1))
    if m.group(2) is not None:
        den = float(m.group(2))
        if den <= 0:
            return None
        if den != high:
            v = v * high / den
    return v if low <= v <= high else None


def parse_yes_no(text: str) -> float | None:
    """1.0 for yes, 0.0 for no, None when unclear. The answer's first word decides ("Yes, ..."
    -> yes, :func:`vlmalign.eval.metrics.yes_no`); otherwise the words "yes" / "no" anywhere,
    when only one of the two appears."""
    first = yes_no(text)
    if first is not None:
        return 1.0 if first == "yes" else 0.0
    words = set(re.findall(r"[a-z]+", text.lower()))
    if ("yes" in words) != ("no" in words):
        return 1.0 if "yes" in words else 0.0
    return None


class JudgeReward(RewardSource):
    """A VLM judge: for each input, the judge sees the prompt's images and ``template``
    filled with {question} (the last user message's text), {response} and {reference}, and
    answers greedily (``max_new_tokens``) through :func:`vlmalign.rollout.generate.generate`
    (its batches encode each unique image once).

    ``mode="score"``: :func:`parse_score` on [``low``, ``high``]; ``normalize`` maps it to
    (s - low) / (high - low). ``mode="yes_no"``: :func:`parse_yes_no` (1 / 0). An unparsable
    answer gets ``default`` (before normalisation it is used as is) and is counted in
    ``stats()["unparsable"]``; the last batch's raw answers are kept in ``last_outputs``.

    Default templates ask for a 1-10 score or yes/no, with a reference line when the input has a
    reference. A custom template that uses {reference} raises on inputs without one.
    ``adapter``: a loaded adapter (e.g. the policy's own, for self-judging) or a model path.
    """

    def __init__(self, adapter, template: str | None = JudgeSpec.template, *, mode: str = JudgeSpec.mode,
                 low: float = JudgeSpec.low, high: float = JudgeSpec.high, normalize: bool = JudgeSpec.normalize,
                 default: float = JudgeSpec.default, max_new_tokens: int = JudgeSpec.max_new_tokens,
                 batch_size: int = JudgeSpec.batch_size, max_length: int | None = JudgeSpec.max_length,
                 system: str | None = JudgeSpec.system, image_root=None, device=None, dtype=None,
                 trust_remote_code: bool = False, name: str = "judge"):
        from ..data.batching import ImageLoader
        validate_config(JudgeSpec(template=template, mode=mode, low=float(low), high=float(high), normalize=normalize,
                                  default=float(default), max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  max_length=max_length, system=system))
        if template is not None:
            check_template(template, _FIELDS)
        if isinstance(adapter, (str, Path)):
            from ..models import load_adapter
            adapter = load_adapter(str(adapter), trust_remote_code=trust_remote_code, dtype=dtype, device=device)
        self.adapter = adapter
        self.template = template
        self.mode = mode
        self.low, self.high = float(low), float(high)
        self.normalize = normalize
        self.default = float(default)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_length = max_length
        self.system = system
        self.name = name
        self.loader = ImageLoader(adapter, image_root)
        self.judged = 0
        self.unparsable = 0
        self.last_outputs: list[str] = []

    def _template_for(self, inp: RewardInput) -> str:
        if self.template is not None:
            return self.template
        if self.mode == "score":
            return SCORE_TEMPLATE if inp.reference is None else SCORE_TEMPLATE_WITH_REFERENCE
        return YES_NO_TEMPLATE if inp.reference is None else YES_NO_TEMPLATE_WITH_REFERENCE

    def messages(self, inp: RewardInput, position: int = 0) -> list[Message]:
        """The judge's prompt for one input: [system], user(images..., filled template)."""
        tpl = self._template_for(inp)
        if inp.reference is None and "{reference}" in tpl:
            raise inp.error(f"the judge template of {self.name!r} uses {{reference}} but this record has no "
                            "reference answer", "reference", position)
        text = tpl.format(question=inp.question, response=inp.response,
                          reference="" if inp.reference is None else inp.reference)
        msgs = [Message.system(self.system)] if self.system else []
        return msgs + [Message.user(*inp.images, text)]

    def parse(self, text: str) -> float | None:
        if self.mode == "yes_no":
            return parse_yes_no(text)
        v = parse_score(text, self.low, self.high)
        if v is not None and self.normalize:
            v = (v - self.low) / (self.high - self.low)
        return v

    @torch.no_grad()
    def __call__(self, inputs: Sequence[RewardInput]) -> torch.Tensor:
        from ..rollout.generate import SamplingConfig, generate
        inputs = list(inputs)
        prompts = [self.messages(inp, i) for i, inp in enumerate(inputs)]
        cfg = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0)
        try:
            outs = generate(self.adapter, prompts, self.loader, cfg, batch_size=self.batch_size,
                            max_length=self.max_length)
        except DataError as e:
            raise self._locate(e, inputs, prompts) from None
        texts = [o[0] for o in outs]
        vals = []
        for txt in texts:
            v = self.parse(txt)
            if v is None:
                self.unparsable += 1
                v = self.default
            vals.append(v)
        self.judged += len(inputs)
        self.last_outputs = texts
        return _as_scores(vals, inputs, self.name)

    def _locate(self, err: DataError, inputs, prompts) -> DataError:
        """Generation batches do not know records: find the input whose prompt fails."""
        for i, (inp, msgs) in enumerate(zip(inputs, prompts)):
            try:
                imgs = [self.loader.inputs(r) for r in inp.images]
                self.adapter.tokenize_prompt(msgs, imgs, max_length=self.max_length)
            except DataError as e:
                return inp.error(f"judge {self.name!r}: {e.reason}", e.field, i)
        return DataError(f"judge {self.name!r}: {err.reason}", file=err.file, index=err.index, field=err.field)

    def stats(self) -> dict[str, float]:
        return {"judged": float(self.judged), "unparsable": float(self.unparsable),
                "unparsable_rate": self.unparsable / self.judged if self.judged else 0.0}


# ----------------------------------------------------------------------------- combination
class CombinedReward:
    """``total = sum_s w_s * source_s(inputs)``; ``__call__`` returns ``(total (N,), parts)``
    where ``parts`` maps each source's (unique) name to its UNWEIGHTED (N,) values, for logging.
    Weights may be negative (penalties) or 0 (computed and logged, not optimised)."""

    def __init__(self, sources: Sequence[tuple[Callable, float]]):
        if not sources:
            raise ConfigError("a reward needs at least one source")
        self.sources: list[tuple[str, Callable, float]] = []
        seen: dict[str, int] = {}
        for k, item in enumerate(sources):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ConfigError(f"reward source {k}: expected (source, weight), got {item!r}")
            src, w = item
            if not callable(src):
                raise ConfigError(f"reward source {k} is not callable")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ConfigError(f"reward source {k}: weight must be a finite number, got {w!r}")
            base = getattr(src, "name", None) or getattr(src, "__name__", None) or f"source{k}"
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}_{seen[base]}"
            self.sources.append((name, src, float(w)))

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.sources]

    @property
    def weights(self) -> dict[str, float]:
        return {n: w for n, _, w in self.sources}

    def __call__(self, inputs: Sequence[RewardInput]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = list(inputs)
        total = torch.zeros(len(inputs), dtype=torch.float32)
        parts = {}
        for name, src, w in self.sources:
            v = _as_scores(src(inputs), inputs, name)
            parts[name] = v
            total = total + w * v
        return total, parts

    def stats(self) -> dict[str, float]:
        out = {}
        for name, src, _ in self.sources:
            st = getattr(src, "stats", None)
            for k, v in (st() if callable(st) else {}).items():
                out[f"{name}/{k}"] = v
        return out


# ----------------------------------------------------------------------------- recipes
def _spec_error(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def build_source(spec: dict, *, where: str = "reward[0]", image_root=None, device=None, dtype=None,
                 base_dir=None) -> tuple[Any, float]:
    """One recipe dict -> (source, weight). Keys: ``type`` (function | model | judge) and the
    fields of its spec (:mod:`.specs`: ``weight``, ``label`` and per type ``name`` / ``args``,
    ``path`` / ``batch_size`` / ..., ``path`` / ``template`` / ``mode`` / ...). Relative paths
    are resolved against ``base_dir`` when given."""
    s = parse_source(spec, where)
    kind, label = spec["type"], s.label

    def path_of(p):
        if not p or not isinstance(p, (str, Path)):
            raise _spec_error(where, f"a {kind} reward needs 'path' (a model directory)")
        p = Path(p)
        if base_dir is not None and not p.is_absolute():
            p = Path(base_dir) / p
        if not p.exists():
            raise _spec_error(where, f"{kind} path {str(p)!r} does not exist")
        return str(p)

    try:
        if kind == "function":
            src = FunctionReward(s.name, name=label or s.name, kwargs=s.args)
        elif kind == "model":
            src = RewardModelSource(path_of(s.path), image_root=image_root, device=device, dtype=dtype,
                                    name=label or "model", batch_size=s.batch_size, max_length=s.max_length,
                                    empty_score=s.empty_score, base=s.base)
        else:
            src = JudgeReward(path_of(s.path), s.template, mode=s.mode, low=s.low, high=s.high, normalize=s.normalize,
                              default=s.default, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                              max_length=s.max_length, system=s.system, image_root=image_root, device=device,
                              dtype=dtype, name=label or "judge")
    except ConfigError as e:
        msg = str(e)
        raise (e if msg.startswith(where) else _spec_error(where, msg)) from None
    return src, float(s.weight)


def build_reward(specs: Sequence[dict], *, image_root=None, device=None, dtype=None, base_dir=None,
                 where: str = "reward") -> CombinedReward:
    """Recipe list -> :class:`CombinedReward`, e.g.::

        [{"type": "function", "name": "exact_match", "weight": 1.0},
         {"type": "model", "path": "runs/rm", "weight": 0.5},
         {"type": "judge", "path": "models/judge", "mode": "yes_no", "weight": 0.2}]

    Errors name the entry (``reward[1]: ...``)."""
    if isinstance(specs, dict):
        specs = [specs]
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ConfigError(f"{where}: expected a non-empty list of reward sources, got {specs!r}")
    return CombinedReward([build_source(s, where=f"{where}[{i}]", image_root=image_root, device=device, dtype=dtype,
                                        base_dir=base_dir) for i, s in enumerate(specs)])
