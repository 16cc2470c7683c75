"""Command-line input is checked before any work: numbers in range, mistyped options named with
the closest valid one, outputs never over inputs, model paths that do not exist named as such,
and a bad record in `generate` stops naming file and record (or is skipped and counted)."""

from __future__ import annotations

import json

import pytest

from vlmalign.cli.main import main
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.models import save_tiny


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_inputs")
    generate_shapesworld(root / "data", ShapesConfig(seed=3, train_images=6, eval_images=3))
    save_tiny("llava", str(root / "model"))
    return root


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flag,value,needle", [
    ("--limit", "-1", "-1 is out of range (must be >= 1)"), ("--limit", "0", ">= 1"), ("--temperature", "-1", ">= 0"),
    ("--num-samples", "0", ">= 1"), ("--batch-size", "0", ">= 1"), ("--top-p", "1.5", "in (0, 1]"),
    ("--max-new-tokens", "x", "expected an integer"),
])
def test_generate_numbers_out_of_range_are_refused_by_argparse(world, tmp_path, capsys, flag, value, needle):
    code, err = _exit(["generate", "--model", str(world / "model"), "--data", str(world / "data" / "vqa_eval.json"),
                       "--out", str(tmp_path / "o.jsonl"), flag, value], capsys)
    assert code == 2 and needle in err and flag in err, err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("argv,wrong,right", [
    (["generate", "--modle", "m", "--data", "d", "--out", "o"], "--modle", "--model"),
    (["score", "--model", "m", "--data", "d", "--batch-sise", "3"], "--batch-sise", "--batch-size"),
    (["train", "sft", "--confg", "x.yaml"], "--confg", "--config"),
])
def test_a_mistyped_option_is_named_with_the_closest_valid_one(capsys, argv, wrong, right):
    code, err = _exit(argv, capsys)
    assert code == 2 and f"{wrong} (did you mean {right}?)" in err, err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "prompts per batch (default: 16)" in out
    assert "(default: raise)" in out


def test_generate_refuses_to_write_over_its_data_file(world, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text((world / "data" / "vqa_eval.json").read_text())
    before = data.read_bytes()
    rc = main(["generate", "--model", str(world / "model"), "--data", str(data), "--out", str(data),
               "--image-root", str(world / "data")])
    assert rc == 2 and "would overwrite the input" in capsys.readouterr().err
    assert data.read_bytes() == before


def test_score_refuses_to_write_over_its_data_file(world, tmp_path, capsys):
    data = tmp_path / "p.json"
    data.write_text("[]")
    rc = main(["score", "--model", str(world / "model"), "--data", str(data), "--out", str(data)])
    assert rc == 2 and "would overwrite the input" in capsys.readouterr().err
    assert data.read_text() == "[]"


def test_the_directory_guard_refuses_the_input_itself_inside_or_above_it(tmp_path):
    # the same guard through `vlmalign export`: tests/integration/test_infer_cli.py
    from vlmalign.cli.args import refuse_output_over_input
    from vlmalign.errors import VlmalignError
    base = tmp_path / "base"
    base.mkdir()
    for out in (base, base / "merged", tmp_path):
        with pytest.raises(VlmalignError, match="would overwrite the input"):
            refuse_output_over_input(out, base, directory=True)
    refuse_output_over_input(tmp_path / "elsewhere", base, directory=True)


def test_a_model_path_that_does_not_exist_is_named(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "d.json"),
               "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and f"model directory not found: {tmp_path / 'nope'}" in err, err
    (tmp_path / "empty").mkdir()
    rc = main(["generate", "--model", str(tmp_path / "empty"), "--data", str(tmp_path / "d.json"),
               "--out", str(tmp_path / "o.jsonl")])
    assert rc == 2 and "not a model directory" in capsys.readouterr().err


def _with_missing_image(world, tmp_path):
    recs = json.loads((world / "data" / "vqa_eval.json").read_text())[:3]
    recs[1]["image"] = "no_such.png"
    data = tmp_path / "d.json"
    data.write_text(json.dumps(recs))
    return data, len(recs)


def test_generate_stops_on_a_missing_image_naming_file_and_record(world, tmp_path, capsys):
    data, _ = _with_missing_image(world, tmp_path)
    rc = main(["generate", "--model", str(world / "model"), "--data", str(data), "--out", str(tmp_path / "o.jsonl"),
               "--image-root", str(world / "data"), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and str(data) in err and "no_such.png" in err and "record 1" in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_on_error_skip_counts_what_it_skipped(world, tmp_path, caplog):
    data, n = _with_missing_image(world, tmp_path)
    out = tmp_path / "o.jsonl"
    rc = main(["generate", "--model", str(world / "model"), "--data", str(data), "--out", str(out),
               "--image-root", str(world / "data"), "--max-new-tokens", "2", "--on-error", "skip"])
    assert rc == 0
    assert len(out.read_text().splitlines()) == n - 1
    assert f"skipped 1 of {n} records" in caplog.text


def test_generate_warns_when_the_file_places_images_unlike_the_model_and_can_follow_it(world, tmp_path, caplog,
                                                                                      capsys):
    import shutil

    from vlmalign.models.prompt_layout import write_layout
    model = tmp_path / "model"
    shutil.copytree(world / "model", model)
    write_layout(model, {"image_position": "after", "counts": {"before": 0, "after": 5, "inside": 0}})
    data = world / "data" / "vqa_eval.json"  # "<image>\nquestion": images before the text
    base = ["generate", "--model", str(model), "--data", str(data), "--max-new-tokens", "2", "--limit", "3"]
    with caplog.at_level("WARNING", logger="vlmalign"):
        assert main([*base, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert "3 of 3 prompts do not put their images after the text" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlmalign"):
        assert main([*base, "--out", str(tmp_path / "b.jsonl"), "--image-position", "model"]) == 0
    assert "do not put their images" not in caplog.text
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    rc = main([*base[:2], str(world / "model"), *base[3:], "--out", str(tmp_path / "c.jsonl"),
               "--image-position", "model"])
    assert rc == 2 and "--image-position model needs the model's vlmalign_prompt.json" in capsys.readouterr().err
    assert not (tmp_path / "c.jsonl").exists()
