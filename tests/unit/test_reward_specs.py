"""The reward sources of a recipe are declared once (vlmalign.rewards.specs): parse_source reads
an entry against its declaration, the source classes start from the same defaults, and the docs
name every key."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest

from vlmalign.config import ConfigError
from vlmalign.rewards import JudgeReward, RewardModelSource
from vlmalign.rewards.specs import SOURCES, FunctionSpec, JudgeSpec, ModelSpec, parse_source, source_keys

DOCS = Path(__file__).resolve().parents[2] / "docs" / "RL.md"


def test_an_entry_is_read_against_its_declaration():
    s = parse_source({"type": "judge", "path": "j", "mode": "yes_no", "batch_size": "4"}, "reward[2]")
    assert isinstance(s, JudgeSpec) and (s.mode, s.batch_size, s.max_new_tokens, s.weight) == ("yes_no", 4, 16, 1.0)
    f = parse_source({"type": "function", "name": "exact_match"})
    assert isinstance(f, FunctionSpec) and f.args == {} and f.label is None
    with pytest.raises(ConfigError, match=r"reward\[1\]: unknown key 'batchsize' for a model reward; did you mean "
                                          r"'batch_size'"):
        parse_source({"type": "model", "path": "m", "batchsize": 4}, "reward[1]")
    with pytest.raises(ConfigError, match=r"reward\[0\]\.batch_size: 0 is out of range \(must be >= 1\)"):
        parse_source({"type": "model", "path": "m", "batch_size": 0})
    with pytest.raises(ConfigError, match=r"reward\[0\]\.mode: 'stars' is not one of score, yes_no"):
        parse_source({"type": "judge", "path": "j", "mode": "stars"})
    with pytest.raises(ConfigError, match=r"reward\[0\]: judge score range needs low < high"):
        parse_source({"type": "judge", "path": "j", "low": 5, "high": 5})
    with pytest.raises(ConfigError, match=r"reward\[0\]: a function reward needs 'name'"):
        parse_source({"type": "function"})
    with pytest.raises(ConfigError, match=r"reward\[0\]\.weight: expected float"):
        parse_source({"type": "function", "name": "exact_match", "weight": "heavy"})
    with pytest.raises(ConfigError, match=r"reward\[0\]: weight must be a finite number"):
        parse_source({"type": "function", "name": "exact_match", "weight": float("nan")})


@pytest.mark.parametrize("cls, spec", [(RewardModelSource, ModelSpec), (JudgeReward, JudgeSpec)])
def test_the_source_classes_start_from_the_spec_defaults(cls, spec):
    params = inspect.signature(cls.__init__).parameters
    for f in fields(spec):
        if f.name in params:
            assert params[f.name].default == f.default, f.name


def test_the_docs_name_every_key_of_every_source_type():
    text = DOCS.read_text()
    for kind in SOURCES:
        for key in source_keys(kind):
            assert f"`{key}`" in text, (kind, key)
