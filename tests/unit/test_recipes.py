"""Every shipped recipe loads with its method's config class (so unknown keys and typos fail
here), follows the conventions of recipes/README.md, and the quickstart recipes train."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from vlmalign.methods.registry import methods as _methods
from vlmalign.config import ConfigError, load_config
from vlmalign.models import families

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
ALL = sorted(RECIPES.rglob("*.yaml"))

SHIPPED = {
    "quickstart/pretrain.yaml", "quickstart/sft.yaml",
    "llava/pretrain.yaml", "llava/sft.yaml", "llava/sft_lora.yaml",
    "llava_next/sft.yaml", "qwen2_vl/sft.yaml", "qwen2_vl/sft_lora.yaml", "qwen2_5_vl/sft.yaml",
    "idefics3/sft.yaml", "paligemma/sft.yaml", "instructblip/sft.yaml", "gemma3/sft.yaml",
    "qwen3_vl/sft_lora.yaml", "internvl/sft.yaml", "mllama/sft.yaml",
}
TINY = ("quickstart", "quickstart_real", "self_critique")   # ShapesWorld recipes: local paths, not hub ids
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _method(path: Path) -> str:
    """The convention: the file name's first word names the method."""
    return path.stem.split("_")[0]


def _load(path: Path, overrides=()):
    methods = _methods()
    method = _method(path)
    assert method in methods, f"{path}: no train method {method!r} (known: {', '.join(methods)})"
    return load_config(methods[method].config, path, list(overrides))


def _rel(p: Path) -> str:
    return p.relative_to(RECIPES).as_posix()


def test_the_expected_recipes_are_shipped():
    assert SHIPPED <= {_rel(p) for p in ALL}


@pytest.mark.parametrize("path", ALL, ids=_rel)
def test_recipe_loads_with_its_methods_config(path):
    cfg = _load(path)
    family = path.parent.name
    assert family in TINY or family in families(), f"{family}: not an adapter family"
    assert bool(cfg.model.path) != bool(cfg.model.tiny), "set exactly one of model.path / model.tiny"
    assert cfg.data.train_file, "a recipe names its training data"
    if family not in TINY:
        assert HUB_ID.match(cfg.model.path), f"family recipes start from a hub id, got {cfg.model.path!r}"
        assert cfg.model.trust_remote_code is False
    if "lora" in path.stem.split("_")[1:]:
        assert cfg.lora.enabled
    else:
        assert not cfg.lora.enabled
    if _method(path) == "pretrain":
        assert (cfg.model.train_vision, cfg.model.train_projector, cfg.model.train_language) == \
            (False, True, False)
    # every key in the file is an option: nothing was silently dropped
    import yaml
    raw = yaml.safe_load(path.read_text())

    def walk(obj, data, where=""):
        for k, v in data.items():
            assert k in {f.name for f in fields(obj)}, where + k
            cur = getattr(obj, k)
            if is_dataclass(cur):
                walk(cur, v, where + k + ".")
            else:
                assert cur == v or (isinstance(v, list) and list(cur) == v), (where + k, cur, v)
    walk(cfg, raw)


def test_a_typo_in_a_recipe_fails_to_load(tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text((RECIPES / "llava" / "sft.yaml").read_text().replace("warmup_ratio:", "warmup_ration:"))
    with pytest.raises(ConfigError, match="warmup_ration.*did you mean 'warmup_ratio'"):
        _load(bad)


def test_the_quickstart_chain_points_at_the_pretrain_output():
    pre = _load(RECIPES / "quickstart" / "pretrain.yaml")
    sft = _load(RECIPES / "quickstart" / "sft.yaml")
    assert sft.model.path == f"{pre.train.output_dir}/checkpoints/step-{pre.train.max_steps}/model"


# ----------------------------------------------------------------------------- quickstart runs
SHAPES = "data/shapesworld/"


def _relocate(cfg, data_dir: Path, out: Path, name: str):
    """Point the recipe's ShapesWorld paths at ``data_dir`` (they must exist there) and its run
    directory into ``out``; every file the recipe names is one ShapesWorld writes."""
    def moved(v):
        if isinstance(v, str) and v.startswith(SHAPES):
            p = data_dir / v[len(SHAPES):]
            assert p.exists(), f"{name}: {v} is not a file `vlmalign data synth shapes` writes"
            return str(p)
        return v
    for sect in (cfg.data, cfg.eval):
        for f in fields(sect):
            setattr(sect, f.name, moved(getattr(sect, f.name)))
    cfg.eval.tasks = [{k: moved(v) for k, v in e.items()} for e in cfg.eval.tasks]
    cfg.train.output_dir = str(out / cfg.train.output_dir)
    return cfg


@pytest.mark.slow
def test_quickstart_recipes_train_one_step_each(tmp_path):
    from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
    from vlmalign.methods.sft import train_sft

    data_dir = tmp_path / "shapesworld"
    generate_shapesworld(data_dir, ShapesConfig(seed=0, train_images=8, eval_images=4))
    from vlmalign.data.synthetic.benchmarks import write_benchmarks
    write_benchmarks(data_dir)    # as `vlmalign data synth shapes` does: the recipes' eval.tasks read them
    small = ["train.max_steps=1", "train.batch_size=4", "train.progress=false", "data.max_train_samples=8"]

    # stage 1 starts from the tiny model its header builds (`vlmalign models tiny llava --init-std 0.125`)
    from vlmalign.cli.main import main
    tiny = tmp_path / "tiny"
    pre_raw = _load(RECIPES / "quickstart" / "pretrain.yaml")
    assert pre_raw.model.path == "runs/quickstart/tiny"
    assert main(["models", "tiny", "llava", "--out", str(tiny), "--init-std", "0.125"]) == 0
    pre = _relocate(_load(RECIPES / "quickstart" / "pretrain.yaml", [*small, f"model.path={tiny}"]), data_dir,
                    tmp_path, "pretrain")
    result, _ = train_sft(pre)
    assert result.step == 1 and result.checkpoint
    model_dir = Path(result.checkpoint) / "model"
    assert model_dir.is_dir()

    # stage 2 starts from stage 1's final checkpoint, as the recipe's model.path says
    sft = _relocate(_load(RECIPES / "quickstart" / "sft.yaml", [*small, f"model.path={model_dir}"]),
                    data_dir, tmp_path, "sft")
    result, adapter = train_sft(sft)
    assert result.step == 1 and result.metrics["loss"] > 0
    assert {"eval/vqa/accuracy", "eval/pope/f1", "eval/mmbench/accuracy", "eval/chair/chair_s"} <= result.metrics.keys()
    assert (Path(sft.train.output_dir) / "metrics.jsonl").exists()
    assert adapter.family == "llava"
