"""`vlmalign data synth shapes` through `register` on a throwaway parser (and through the real
`vlmalign` entry point when the `data` group registers it)."""

import argparse
import importlib
import json

import pytest

from vlmalign.data.synthetic import FILES, ShapesConfig, generate_shapesworld
from vlmalign.cli.synth import register
from vlmalign.errors import VlmalignError


def _parser():
    parser = argparse.ArgumentParser(prog="vlmalign")
    top = parser.add_subparsers(dest="command")
    data = top.add_parser("data").add_subparsers(dest="data_command")
    register(data)
    return parser


def test_cli_writes_the_same_files_as_the_library(tmp_path, capsys):
    args = _parser().parse_args(
        ["data", "synth", "shapes", "--out", str(tmp_path / "cli"), "--seed", "5", "--train", "12",
         "--eval", "6", "--image-size", "48", "--grid", "3", "--max-objects", "4",
         "--colours", "red,green,blue", "--question-types", "colour,count,existence",
         "--image-position", "after", "--max-turns", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "12 train + 6 eval" in out and "dpo_train.json" in out and "manifest.json" in out
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    config = ShapesConfig.from_dict(manifest["config"])
    assert config == ShapesConfig(seed=5, train_images=12, eval_images=6, image_size=48, grid=3,
                                  max_objects=4, colours=("red", "green", "blue"),
                                  question_types=("colour", "count", "existence"), image_position="after",
                                  max_turns=1)
    lib = generate_shapesworld(tmp_path / "lib", config)
    for name, (fname, _, _) in FILES.items():
        assert (tmp_path / "cli" / fname).read_bytes() == lib[name].read_bytes(), fname


def test_cli_defaults_are_the_config_defaults():
    args = _parser().parse_args(["data", "synth", "shapes", "--out", "x"])
    d = ShapesConfig()
    assert (args.seed, args.train_images, args.eval_images, args.image_size, args.grid,
            args.colours, args.shapes, args.question_types, args.paraphrases, args.jitter, args.max_turns,
            args.image_position) == (
        d.seed, d.train_images, d.eval_images, d.image_size, d.grid, d.colours, d.shapes,
        d.question_types, d.paraphrases, d.jitter, d.max_turns, d.image_position)


def test_cli_bad_options_are_clear_errors(tmp_path):
    parser = _parser()
    args = parser.parse_args(["data", "synth", "shapes", "--out", str(tmp_path), "--colours", "red,mauve"])
    with pytest.raises(VlmalignError, match="mauve"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth", "shapes", "--out", str(tmp_path), "--grid", "5"])
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth", "shapes", "--out", str(tmp_path), "--image-position", "middle"])
    with pytest.raises(ValueError, match="image_position must be one of before, after"):
        ShapesConfig(image_position="middle")
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth"])


def test_real_entry_point_when_available(tmp_path, capsys):
    try:
        importlib.import_module("vlmalign.cli.data")
    except ImportError:
        pytest.skip("vlmalign.cli.data (the `data` command group) is not there yet")
    from vlmalign.cli.main import main
    assert main(["data", "synth", "shapes", "--out", str(tmp_path), "--train", "4", "--eval", "2"]) == 0
    assert (tmp_path / "manifest.json").is_file()
