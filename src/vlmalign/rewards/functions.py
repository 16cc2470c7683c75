"""Built-in verifiable reward functions and the registry that names them in recipes.

A reward FUNCTION takes a list of :class:`RewardInput` (plus keyword options from the recipe's
``args``) and returns one float per input. Built-ins:

* ``exact_match``: 1.0 when the response equals the reference answer after
  :func:`vlmalign.data.synthetic.verify.normalize_answer` (case, punctuation, articles, number
  words), else 0.0. ``answer_pattern``: a regex; the answer is the LAST match's first group
  (the whole match if it has no group), e.g. ``"<answer>(.*?)</answer>"``; no match -> 0.
* ``contains_answer``: 1.0 when the normalised reference appears in the normalised response
  as whole words ("2" is in "there are 2 circles", not in "12"); ``answer_pattern`` as above.
* ``mc_letter``: multiple choice; 1.0 when the letter extracted from the response (rules in
  :func:`extract_choice`) equals the reference's letter. ``letters`` (default ``"ABCD"``).
* ``caption_errors``: the ShapesWorld description verifier: minus the number of grid cells the
  response gets wrong against the reference caption (an object named with a wrong colour or
  shape, one in an empty cell, one left out: :func:`vlmalign.data.synthetic.caption_errors`), so
  a faithful description scores 0 and each hallucinated or missed object costs 1.
* ``format``: 1.0 when the response matches ``pattern`` (``mode`` ``fullmatch`` (default) or
  ``search``; ``.`` matches newlines), else 0.0. ``require_finished``: also 0.0 when generation
  did not stop on an end-of-turn token (hit ``max_new_tokens``).
* ``length_penalty``: DAPO's soft overlong punishment (Yu et al. 2025): 0 up to
  ``max_length - buffer``, then linearly down to -1 at ``max_length``, -1 beyond; ``unit`` is
  ``tokens`` (needs ``RewardInput.response_tokens``), ``chars`` or ``words``.

A recipe may also name ``"package.module:function"``: the module is imported with
:func:`importlib.import_module` (from the Python path, like any import: nothing is downloaded
and only the code the recipe names runs) and the function is called like a built-in.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..config import ConfigError
from ..data.schema import ImageRef, Message, images_of
from ..data.synthetic.verify import answer_matches, caption_errors, normalize_answer
from ..errors import DataError

RewardFn = Callable[..., Sequence[float]]
REWARD_FUNCTIONS: dict[str, RewardFn] = {}


@dataclass
class RewardInput:
    """One response to score.

    ``prompt``: the messages shown to the policy (image parts included); ``images``: the
    prompt's images in order (filled from ``prompt`` when omitted; must equal them when given);
    ``response``: the generated text; ``reference``: the reference answer or None; ``meta``:
    the record's meta dict. ``finished``: True when generation stopped on an end-of-turn token,
    False when it hit the token budget, None when unknown. ``response_tokens``: the response's
    length in tokens, if known. ``source`` / ``index``: the record's file and position, used to
    name it in errors.
    """

    prompt: list[Message]
    response: str
    images: list[ImageRef] | None = None
    reference: str | None = None
    meta: dict = field(default_factory=dict)
    finished: bool | None = None
    response_tokens: int | None = None
    source: str | None = None
    index: int | None = None

    def __post_init__(self):
        if not isinstance(self.response, str):
            raise TypeError(f"RewardInput.response must be a str, got {type(self.response).__name__}")
        found = images_of(self.prompt)
        if self.images is None:
            self.images = found
        elif list(self.images) != found:
            raise ValueError(f"RewardInput.images ({len(self.images)}) differ from the images in the prompt "
                             f"messages ({len(found)}); sources show the prompt's images")

    @classmethod
    def from_record(cls, record, response: str, **kw) -> "RewardInput":
        """From an :class:`~vlmalign.data.schema.RLPrompt` (or any record with ``prompt``)."""
        return cls(prompt=list(record.prompt), response=response, reference=getattr(record, "reference", None),
                   meta=dict(record.meta), source=record.source, index=record.index, **kw)

    @property
    def question(self) -> str:
        """The text of the last user message (what a judge is told the question was)."""
        users = [m for m in self.prompt if m.role == "user"]
        return users[-1].text.strip() if users else ""

    def error(self, reason: str, field: str | None = None, position: int | None = None) -> DataError:
        """A DataError naming this input's record (or its position in the batch when unknown)."""
        if self.source is None and self.index is None and position is not None:
            reason = f"reward input {position}: {reason}"
        return DataError(reason, file=self.source, index=self.index, field=field)


# ----------------------------------------------------------------------------- registry
def register_reward(name: str):
    """Decorator: make a reward function available to recipes under ``name``."""
    def deco(fn):
        if name in REWARD_FUNCTIONS:
            raise ValueError(f"reward function {name!r} is already registered")
        REWARD_FUNCTIONS[name] = fn
        return fn
    return deco


def resolve_function(name: str) -> RewardFn:
    """A built-in name, or ``"package.module:function"`` (imported; the attribute may be dotted)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"reward function name must be a non-empty string, got {name!r}")
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" not in name:
        import difflib
        close = difflib.get_close_matches(name, REWARD_FUNCTIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown reward function {name!r}{hint} (built-ins: {', '.join(sorted(REWARD_FUNCTIONS))};"
                          " or name your own as 'package.module:function')")
    mod_name, _, attr = name.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"reward function {name!r}: expected 'package.module:function'")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"reward function {name!r}: cannot import module {mod_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward function {name!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward function {name!r} is a {type(obj).__name__}, not callable")
    return obj


def check_options(fn: RewardFn, name: str, options: dict) -> None:
    """Fail at build time when ``options`` do not fit ``fn``'s keyword parameters."""
    try:
        inspect.signature(fn).bind([], **options)
    except TypeError as e:
        raise ConfigError(f"reward function {name!r}: bad args {sorted(options)} ({e})") from None
    except ValueError:  # no signature (builtins): cannot check
        return
    if fn is REWARD_FUNCTIONS.get(name):
        try:  # built-ins validate their option values on an empty batch
            fn([], **options)
        except (ValueError, TypeError, re.error) as e:
            raise ConfigError(f"reward function {name!r}: {e}") from None


# ----------------------------------------------------------------------------- helpers
def _reference(inp: RewardInput, i: int, fn: str) -> str:
    if inp.reference is None or not str(inp.reference).strip():
        raise inp.error(f"{fn} needs a reference answer; this record has none", "reference", i)
    return str(inp.reference)


def _compile(pattern: str | None, what: str) -> re.Pattern | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ValueError(f"{what} must be a regex string, got {type(pattern).__name__}")
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regex ({e})") from None


def extract_answer(text: str, pattern: re.Pattern | None) -> str | None:
    """The answer part of a response: the whole text, or the last match of ``pattern`` (its
    first group when it has one). None when the pattern does not match."""
    if pattern is None:
        return text
    last = None
    for last in pattern.finditer(text):
        pass
    if last is None:
        return None
    return last.group(1) if pattern.groups else last.group(0)


# ----------------------------------------------------------------------------- built-ins
@register_reward("exact_match")
def exact_match(inputs: Sequence[RewardInput], answer_pattern: str | None = None) -> list[float]:
    pat = _compile(answer_pattern, "answer_pattern")
    out = []
    for i, inp in enumerate(inputs):
        ref = _reference(inp, i, "exact_match")
        out.append(1.0 if answer_matches(extract_answer(inp.response, pat), ref) else 0.0)
    return out


@register_reward("contains_answer")
def contains_answer(inputs: Sequence[RewardInput], answer_pattern: str | None = None) -> list[float]:
    pat = _compile(answer_pattern, "answer_pattern")
    out = []
    for i, inp in enumerate(inputs):
        ref = normalize_answer(_reference(inp, i, "contains_answer"))
        if not ref:
            raise inp.error(f"reference {inp.reference!r} is empty after normalisation", "reference", i)
        ans = extract_answer(inp.response, pat)
        hay = f" {normalize_answer(ans)} " if ans is not None else ""
        out.append(1.0 if f" {ref} " in hay else 0.0)
    return out


def _letters(letters: str) -> str:
    if not isinstance(letters, str) or not letters.isalpha() or len(set(letters.upper())) != len(letters):
        raise ValueError(f"letters must be distinct letters like 'ABCD', got {letters!r}")
    return letters.upper()


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The multiple-choice letter a response gives (upper case), or None. Rules, first hit wins:

    1. after "answer" ("Answer: b", "the answer is (C)", "answer - D."): the letter, when it is
       in parentheses, upper case, or followed by punctuation / the end of the text;
    2. when the text holds parenthesised letters of two or more kinds ("(A) red (B) blue", a
       list of options), nothing more: None;
    3. the text starts with the letter followed by ``. ) : ,`` or the end ("B.", "(b)", "C"):
       a leading article ("A cat ...") does not count;
    4. a parenthesised letter "(B)" anywhere (all such letters are the same, by rule 2).
    """
    L = _letters(letters)
    s = str(text).strip()
    cls = f"[{L}{L.lower()}]"
    for m in re.finditer(rf"\banswer\b\s*(?:is\s*)?[:\-]?\s*\**(\()?({cls})(\))?\**(?![A-Za-z0-9])(.?)", s,
                         re.IGNORECASE):
        letter, paren, after = m.group(2), m.group(1) and m.group(3), m.group(4)
        if paren or letter.isupper() or after in ("", ".", ",", ";", ":", "!", ")", "\n"):
            return letter.upper()
    found = {x.upper() for x in re.findall(rf"\(({cls})\)", s)}
    if len(found) > 1:   # "(A) red (B) blue": the options are listed, none is chosen
        return None
    m = re.match(rf"\(({cls})\)|({cls})(?:[.):,]|$)", s)
    if m:
        return (m.group(1) or m.group(2)).upper()
    return found.pop() if found else None


@register_reward("mc_letter")
def mc_letter(inputs: Sequence[RewardInput], letters: str = "ABCD") -> list[float]:
    L = _letters(letters)
    out = []
    for i, inp in enumerate(inputs):
        ref = extract_choice(_reference(inp, i, "mc_letter"), L)
        if ref is None:
            raise inp.error(f"mc_letter: reference {inp.reference!r} is not one of the letters {L}", "reference", i)
        out.append(1.0 if extract_choice(inp.response, L) == ref else 0.0)
    return out


@register_reward("caption_errors")
def caption_errors_reward(inputs: Sequence[RewardInput]) -> list[float]:
    return [-float(caption_errors(inp.response, _reference(inp, i, "caption_errors"))) for i, inp in enumerate(inputs)]


@register_reward("format")
def format_reward(inputs: Sequence[RewardInput], pattern: str | None = None, mode: str = "fullmatch",
                  require_finished: bool = False) -> list[float]:
    if pattern is None:
        raise ValueError("format needs a 'pattern' (a regex the response must match)")
    pat = _compile(pattern, "pattern")
    if mode not in ("fullmatch", "search"):
        raise ValueError(f"mode must be 'fullmatch' or 'search', got {mode!r}")
    out = []
    for i, inp in enumerate(inputs):
        if require_finished and inp.finished is None:
            raise inp.error("format: require_finished needs RewardInput.finished (unknown here)", "finished", i)
        ok = (pat.fullmatch(inp.response.strip()) if mode == "fullmatch" else pat.search(inp.response)) is not None
        if require_finished and not inp.finished:
            ok = False
        out.append(1.0 if ok else 0.0)
    return out


@register_reward("length_penalty")
def length_penalty(inputs: Sequence[RewardInput], max_length: int | None = None, buffer: int | None = None,
                   unit: str = "tokens") -> list[float]:
    if not isinstance(max_length, int) or max_length <= 0:
        raise ValueError(f"length_penalty needs max_length, a positive int, got {max_length!r}")
    if not isinstance(buffer, int) or not 0 < buffer <= max_length:
        raise ValueError(f"length_penalty needs buffer, an int in (0, max_length], got {buffer!r}")
    if unit not in ("tokens", "chars", "words"):
        raise ValueError(f"unit must be tokens, chars or words, got {unit!r}")
    start = max_length - buffer
    out = []
    for i, inp in enumerate(inputs):
        if unit == "tokens":
            if inp.response_tokens is None:
                raise inp.error("length_penalty with unit=tokens needs RewardInput.response_tokens",
                                "response_tokens", i)
            n = inp.response_tokens
        else:
            n = len(inp.response) if unit == "chars" else len(inp.response.split())
        out.append(0.0 if n <= start else (-1.0 if n > max_length else (start - n) / buffer))
    return out
