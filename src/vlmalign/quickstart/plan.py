"""The quickstart's plan (``plan.yaml``) and its stages' configs, read from the shipped recipes
(``recipes/quickstart/<stage>.yaml``, this package's ``recipes/`` folder).

:func:`stage_config` is a recipe as written, with its paths moved under the quickstart's output
(``data/shapesworld/`` -> ``OUT/data/``, ``data/shapesworld_rl/`` -> ``OUT/data_rl/``,
``runs/quickstart/`` -> ``OUT/``), its seed, and, for another step count than the recipe's, the
settings that follow the steps (:func:`follow_steps`). At the recipe's own step count
:func:`follow_steps` changes nothing (tests/integration/test_quickstart.py checks it for
every stage).
"""

from __future__ import annotations

import copy
from dataclasses import fields, is_dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RECIPES = HERE / "recipes"
PLAN = yaml.safe_load((HERE / "plan.yaml").read_text())
RL_METHODS = tuple(PLAN["stages"]["rl"])
# ``--preset``: "tiny" (the default: a tiny random-init model, plan.yaml, recipes/quickstart/) or
# "real" (a composed pretrained model, plan_real.yaml, recipes/quickstart_real/)
PRESETS = {"tiny": (PLAN, RECIPES), "real": (yaml.safe_load((HERE / "plan_real.yaml").read_text()),
                                             HERE / "recipes_real")}

# where the recipes put things, and where the quickstart's run puts them (the longest first)
_RECIPE_ROOTS = (("data/shapesworld_rl/", "data_rl"), ("data/shapesworld_real/", "data"), ("data/shapesworld/", "data"),
                 ("runs/quickstart_real/", ""), ("runs/quickstart/", ""))


def plan_of(preset: str = "tiny") -> dict:
    return PRESETS[preset][0]


def data_config(seed: int = 0, preset: str = "tiny"):
    """The ShapesWorld the quickstart generates (``plan.yaml``, ``data``)."""
    from ..data.synthetic import ShapesConfig
    return ShapesConfig(**{**plan_of(preset)["data"], "seed": seed})


def rl_data_config(data, seed: int, steps: int, prompts: int):
    """The RL stage's ShapesWorld: the SFT data's images (same seed and settings) asked in every
    phrasing (``plan.yaml``, ``rl_data``), as many training images as the stage reads prompts."""
    from dataclasses import replace
    return replace(data, seed=seed, train_images=max(steps * prompts, 1), **PLAN["rl_data"])


def tiny_settings(family: str) -> dict:
    return dict(PLAN["tiny"].get(family, {}))


def recipe_path(stage: str, preset: str = "tiny") -> Path:
    return PRESETS[preset][1] / f"{stage}.yaml"


def method_of(stage: str) -> str:
    """The training method of a stage's recipe (the file name's first word, recipes/README.md)."""
    return stage.split("_")[0]


def load_recipe(stage: str, preset: str = "tiny"):
    """The recipe of ``stage`` as its method's config, as written."""
    from ..config import load_config
    from ..methods.registry import get
    return load_config(get(method_of(stage)).config, recipe_path(stage, preset))


def recipe_steps(stage: str, preset: str = "tiny") -> int:
    return load_recipe(stage, preset).train.max_steps


def _moved(v: str, out: Path) -> str:
    for prefix, sub in _RECIPE_ROOTS:
        if v.startswith(prefix):
            return str((out / sub if sub else out) / v[len(prefix):])
    return v


def _move_paths(obj, out: Path) -> None:
    """Every path of a recipe under ``out``: options, and the values of list entries such as
    ``eval.tasks``' data files."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            _move_paths(v, out)
        elif isinstance(v, str):
            setattr(obj, f.name, _moved(v, out))
        elif isinstance(v, list):
            setattr(obj, f.name, [{k: _moved(x, out) if isinstance(x, str) else x for k, x in e.items()}
                                  if isinstance(e, dict) else e for e in v])


def follow_steps(cfg, stage: str, steps: int, recipe=None) -> None:
    """Set ``steps`` and what the recipes derive from it: the records read (one pass: steps x
    batch for rm / dpo, steps x prompts for grpo / ppo), the evaluation interval (the recipe's share
    of the run for rm / dpo: a fifth in the tiny recipes), the RL warm-up (at most a tenth of the run) and PPO's critic warm-up (at
    least one policy step). ``recipe``: the stage's recipe as written (read when not given)."""
    recipe = load_recipe(stage) if recipe is None else recipe
    cfg.train.max_steps = steps
    method = method_of(stage)
    if method in ("rm", "dpo"):
        cfg.data.max_train_samples = steps * cfg.train.batch_size
        # the recipe's share of the run between evaluations (a fifth in recipes/quickstart/)
        cfg.train.eval_every = max(steps * recipe.train.eval_every // recipe.train.max_steps, 1)
    if method in ("grpo", "ppo"):
        cfg.data.max_train_samples = steps * cfg.rollout.prompts_per_step
        cfg.optim.warmup_steps = min(recipe.optim.warmup_steps, steps // 10)
    if method == "ppo":
        cfg.value.warmup_iterations = min(recipe.value.warmup_iterations, max(steps - 1, 0))


def stage_config(stage: str, out: str | Path, *, steps: int | None = None, seed: int = 0, preset: str = "tiny"):
    """``recipes/quickstart/<stage>.yaml`` for a quickstart writing to ``out``: paths under
    ``out``, ``train.seed``, and ``steps`` (default: the recipe's) with :func:`follow_steps`.
    ``model.path`` stays the recipe's: the quickstart sets the model each stage starts from."""
    recipe = load_recipe(stage, preset)
    cfg = copy.deepcopy(recipe)
    _move_paths(cfg, Path(out))
    cfg.train.seed = seed
    follow_steps(cfg, stage, recipe.train.max_steps if steps is None else steps, recipe)
    return cfg
