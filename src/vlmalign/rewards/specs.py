"""The entries of a recipe's ``reward:`` list, declared once: one options dataclass per source
type (``opt`` fields: default, help, choices, range), read by :func:`parse_source` and built
into sources by :func:`vlmalign.rewards.build_reward`. The source classes take their keyword
defaults from these fields, so a recipe and a Python caller start from the same values."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields

from ..config import ConfigError, opt, parse_option, validate_config

JUDGE_MODES = ("score", "yes_no")


@dataclass
class SourceSpec:
    weight: float = opt(1.0, "weight in the sum of sources (negative: a penalty; 0: computed and logged only)")
    label: str | None = opt(None, "the name the source is logged under (default: the function's name, model, "
                                  "judge)")


@dataclass
class FunctionSpec(SourceSpec):
    name: str | None = opt(None, "a built-in reward function (exact_match, contains_answer, mc_letter, format, "
                                 "length_penalty) or package.module:function")
    args: dict = opt({}, "keyword options of the function, checked against its signature")

    def check(self) -> None:
        if not self.name:
            raise ConfigError("a function reward needs 'name' (built-in or 'package.module:function')")


@dataclass
class ModelSpec(SourceSpec):
    path: str | None = opt(None, "a reward-model directory written by `vlmalign train rm`")
    batch_size: int = opt(16, "responses per scoring batch (each batch encodes its unique images once)", ge=1)
    max_length: int | None = opt(None, "refuse a prompt + response longer than this (tokens; never cut)", ge=1)
    empty_score: float | None = opt(None, "the score of an empty response (null: an empty response is an error)")
    base: str | None = opt(None, "the base model of a LoRA reward model (default: the one its adapter names)")


@dataclass
class JudgeSpec(SourceSpec):
    path: str | None = opt(None, "the judge model directory")
    template: str | None = opt(None, "the judge prompt with {question} {response} {reference} (default: a "
                                     "1-10 score or yes/no question, with a reference line when there is one)")
    mode: str = opt("score", "score: a number parsed from the answer; yes_no: 1 for yes, 0 for no", JUDGE_MODES)
    low: float = opt(1.0, "mode=score: the lowest score the judge is asked for")
    high: float = opt(10.0, "mode=score: the highest score the judge is asked for")
    normalize: bool = opt(False, "mode=score: map the score to (s - low) / (high - low)")
    default: float = opt(0.0, "the reward of an unparsable answer (counted in judge/unparsable)")
    max_new_tokens: int = opt(16, "tokens of each verdict", ge=1)
    batch_size: int = opt(8, "judge prompts per generate call", ge=1)
    max_length: int | None = opt(None, "refuse a longer judge prompt (tokens; never cut)", ge=1)
    system: str | None = opt(None, "a system message for the judge")

    def check(self) -> None:
        if self.mode == "score" and not self.low < self.high:
            raise ConfigError(f"judge score range needs low < high, got [{self.low}, {self.high}]")
        if not math.isfinite(self.default):
            raise ConfigError(f"judge default must be a finite number, got {self.default!r}")


SOURCES = {"function": FunctionSpec, "model": ModelSpec, "judge": JudgeSpec}


def source_keys(kind: str) -> set[str]:
    """The keys a ``kind`` entry may have (``type`` included)."""
    return {"type"} | {f.name for f in fields(SOURCES[kind])}


def parse_source(entry, where: str = "reward[0]") -> SourceSpec:
    """One ``reward:`` entry (a mapping with ``type``) as its spec: unknown keys refused with the
    closest one, values coerced and checked against their declaration. Errors start with
    ``where``."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'type', got {type(entry).__name__}")
    kind = entry.get("type")
    if kind not in SOURCES:
        raise ConfigError(f"{where}: type must be one of {', '.join(SOURCES)}, got {kind!r}")
    cls, allowed = SOURCES[kind], source_keys(kind)
    values = {}
    for key, value in entry.items():
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r} for a {kind} reward{hint} "
                              f"(allowed: {', '.join(sorted(allowed))})")
        if key != "type":
            values[key] = parse_option(cls, key, value, where=f"{where}.{key}")
    if not math.isfinite(values.get("weight", 1.0)):
        raise ConfigError(f"{where}: weight must be a finite number, got {values['weight']!r}")
    spec = cls(**values)
    try:
        validate_config(spec)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return spec
