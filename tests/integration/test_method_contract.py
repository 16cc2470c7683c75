"""The method registry is the one table the CLI reads, each option is declared once, and
`vlmalign train METHOD --help` prints the defaults a run of METHOD uses: for every registered
method, the help's defaults are compared with the config.yaml of a real one-step run (every
key the run did not override must have the value the help printed)."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from vlmalign.cli.main import main
from vlmalign.config import flat_options, load_config
from vlmalign.methods.registry import MODULES, Method, get, methods

EXPECTED = ("pretrain", "sft", "rm", "dpo", "kto", "grpo", "ppo")
OPTION = re.compile(r"^  (\S+) = (.*)$")


@functools.cache
def _help(name: str) -> str:
    """What `vlmalign train NAME --help` prints (run in this process, at the 80 columns a pipe
    gets; test_the_docs_list_the_methods_of_the_registry runs the command itself)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), mock.patch.dict(os.environ, {"COLUMNS": "80"}):
        with pytest.raises(SystemExit) as done:
            main(["train", name, "--help"])
    assert done.value.code == 0
    return out.getvalue()


def _help_defaults(text: str) -> dict[str, str]:
    """``key -> the rest of its line`` (default, choices, range, help) from ``--help``."""
    out = {}
    for line in text.splitlines():
        m = OPTION.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _shows(line: str, value) -> bool:
    """Whether a help line's default is ``value`` (then its choices, range or help follow)."""
    r = repr(value)
    return line.startswith(r) and line[len(r):len(r) + 2] in (" [", " (", ": ")


def test_the_registry_lists_every_method_once_in_cli_order():
    table = methods()
    assert tuple(table) == EXPECTED
    assert all(isinstance(m, Method) and m.name == n for n, m in table.items())
    assert len(MODULES) == len(set(MODULES))
    with pytest.raises(KeyError, match="did you mean 'dpo'"):
        get("dop")


@pytest.mark.parametrize("name", EXPECTED)
def test_help_prints_every_option_with_the_default_a_run_starts_from(name):
    cls = get(name).config
    printed = _help_defaults(_help(name))
    defaults = flat_options(cls())
    assert printed.keys() == defaults.keys()
    for key, value in defaults.items():
        assert _shows(printed[key], value), (key, printed[key], value)


def test_method_defaults_are_the_config_classes_defaults():
    # what the factories used to set after construction (and --help did not show)
    dpo, kto, grpo, ppo, pre = (get(n).config() for n in ("dpo", "kto", "grpo", "ppo", "pretrain"))
    for c in (dpo, kto, grpo, ppo):
        assert (c.model.train_vision, c.model.train_projector, c.model.train_language) == (False, False, True)
    assert (dpo.optim.lr, dpo.optim.warmup_ratio) == (kto.optim.lr, kto.optim.warmup_ratio) == (5e-6, 0.1)
    assert (grpo.kl.coef, grpo.optim.lr, grpo.optim.schedule, grpo.optim.warmup_ratio) == (0.04, 1e-6, "constant", 0.0)
    assert (ppo.kl.coef, ppo.kl.estimator, ppo.kl.placement, ppo.update.epochs) == (0.05, "k1", "reward", 4)
    assert (pre.model.train_projector, pre.model.train_language, pre.optim.lr) == (True, False, 1e-3)
    # and the shared sections keep theirs
    assert get("sft").config().optim.lr == 2e-5 and get("sft").config().model.train_projector is True


@pytest.fixture(scope="module")
def world(shapes_llava):
    return shapes_llava


RUN = {  # the smallest run of each method: the only keys set besides model.path and train.*
    "pretrain": ["data.train_file={d}/captions_train.json"],
    "sft": ["data.train_file={d}/vqa_train.json"],
    "rm": ["data.train_file={d}/dpo_train.json"],
    "dpo": ["data.train_file={d}/dpo_train.json", "dpo.ref_cache_dir={w}/ref_cache"],
    "kto": ["data.train_file={d}/kto_train.jsonl", "kto.ref_cache_dir={w}/ref_cache"],
    "grpo": ["data.train_file={d}/rl_train.json", "rollout.prompts_per_step=2", "rollout.k=2",
             "rollout.max_new_tokens=2"],
    "ppo": ["data.train_file={d}/rl_train.json", "rollout.prompts_per_step=2", "rollout.k=2",
            "rollout.max_new_tokens=2"],
}


@pytest.mark.parametrize("name", EXPECTED)
def test_a_run_saves_the_defaults_help_printed_for_every_key_it_did_not_set(name, world, tmp_path):
    out = tmp_path / name
    sets = [s.format(d=world / "data", w=world) for s in RUN[name]] + [
        f"model.path={world / 'model'}", "data.max_length=256", f"train.output_dir={out}", "train.max_steps=1",
        "train.batch_size=2", "train.progress=false"]
    assert main(["train", name, *sets]) == 0
    saved = flat_options(load_config(get(name).config, out / "config.yaml"))
    printed = _help_defaults(_help(name))
    assert saved.keys() == printed.keys()
    given = {s.split("=", 1)[0] for s in sets}
    for key, shown in printed.items():
        if key not in given:
            assert _shows(shown, saved[key]), (key, shown, saved[key])
    assert Path(out / "checkpoints" / "step-1" / "model").is_dir()


def test_the_docs_list_the_methods_of_the_registry():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = re.search(r"vlmalign train \{([a-z,]+)\}", readme).group(1).split(",")
    assert tuple(listed) == tuple(methods())
    text = subprocess.run([sys.executable, "-m", "vlmalign", "train", "--help"], capture_output=True, text=True,
                          check=True).stdout
    for name, m in methods().items():
        assert name in text and m.help.split(" (")[0][:30] in " ".join(text.split()), name
