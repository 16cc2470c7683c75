"""`vlmalign quickstart` (``make demo``): a tiny VLM learns ShapesWorld end to end, offline, on a
CPU, by running the shipped recipes ``recipes/quickstart/*.yaml`` one after another.

* :mod:`.plan` -- ``plan.yaml`` (data, tiny model, stages) and each stage's config: its recipe
  with the quickstart's paths, seed and step count;
* :mod:`.run` -- :func:`run_quickstart`: the stages, their measurements, ``report.json``;
* :mod:`.report` -- the printed table and ``report.md``.
"""

from .plan import RECIPES, RL_METHODS, data_config, follow_steps, load_recipe, rl_data_config, stage_config
from .report import GRPO_KEYS, load_report, render_markdown, render_table, rl_curves
from .run import DATA, run_quickstart, train_dpo_stage, train_rl_stage, train_rm_stage

__all__ = ["DATA", "GRPO_KEYS", "RECIPES", "RL_METHODS", "data_config", "follow_steps", "load_recipe", "load_report",
           "render_markdown", "render_table", "rl_curves", "rl_data_config", "run_quickstart", "stage_config",
           "train_dpo_stage", "train_rl_stage", "train_rm_stage"]
