"""scripts/gpu_check.py's bookkeeping without a GPU: each status (pass, fail, timeout, missing
dependency, skipped for no CUDA or for a check that did not pass), the JSON and markdown it
writes, --dry-run, --only with what a check needs; every training check's overrides are options
of its method; and one real --cpu-smoke run (data + tiny fp32 SFT, every GPU check skipped)."""

from __future__ import annotations

import importlib
import json
import shlex
import sys
from pathlib import Path

import pytest

from vlmalign.config import load_config, validate_config
from vlmalign.methods.registry import get

ROOT = Path(__file__).resolve().parents[2]


sys.path.insert(0, str(ROOT / "scripts"))
driver = importlib.import_module("gpu_check")
checks = importlib.import_module("gpu_check_list")
Check = checks.Check


def _cmd(code: str):
    return lambda ctx, py: [[py, "-c", code]]


FAKE = [
    Check("ok", "passes", _cmd("print('hi')"), verify=lambda ctx: {"answer": 42}, needs_cuda=False),
    Check("broken", "exits 3", _cmd("import sys; sys.exit(3)"), needs_cuda=False),
    Check("hangs", "sleeps past its timeout", _cmd("import time; time.sleep(60)"), needs_cuda=False, timeout=2),
    Check("wrong", "runs, but its result is wrong", _cmd("pass"), verify=lambda ctx: 1 / 0, needs_cuda=False),
    Check("nodep", "needs a package that is not there", _cmd("pass"), needs_cuda=False,
          packages=(("surely-not-a-package-vlm", "surely_not_a_module_vlm"),)),
    Check("gpu", "needs CUDA", _cmd("pass")),
    Check("after", "needs broken", _cmd("pass"), needs_cuda=False, needs=("broken",)),
]


def test_every_status_is_reported_and_written(tmp_path, capsys):
    rc = driver.main(["--out", str(tmp_path), "--cpu-smoke", "--no-install"], checks=FAKE)
    assert rc == 1   # a check failed
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    got = {r["name"]: (r["status"], r["reason"]) for r in report["checks"]}
    assert got["ok"] == ("pass", "")
    assert report["checks"][0]["details"] == {"answer": 42}
    assert got["broken"][0] == "fail" and got["broken"][1].startswith("exit code 3")
    assert got["hangs"] == ("fail", "timed out after 2 s")
    assert got["wrong"][0] == "fail" and "ZeroDivisionError" in got["wrong"][1]
    assert got["nodep"] == ("missing", "missing dependency: surely-not-a-package-vlm is not installed "
                                       "(--no-install given)")
    assert got["gpu"] == ("skipped", "skipped: no CUDA (--cpu-smoke)")
    assert got["after"] == ("skipped", "skipped: needs broken, which did not pass")
    env = report["environment"]
    assert env["mode"] == "cpu-smoke" and env["cuda"] is False and env["torch"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "1 pass, 3 fail, 1 missing, 2 skipped" in md and "| hangs | fail |" in md
    assert "$ " in (tmp_path / "logs" / "broken.log").read_text()


def test_dry_run_runs_nothing(tmp_path):
    assert driver.main(["--out", str(tmp_path), "--dry-run"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {r["status"] for r in report["checks"]} == {"planned"}
    assert [r["name"] for r in report["checks"]] == [c.name for c in checks.CHECKS]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_only_adds_what_a_check_needs():
    assert [c.name for c in driver.select(checks.CHECKS, "qlora_dpo")] == ["data", "model_05b", "qlora_dpo"]
    with pytest.raises(SystemExit, match="unknown check"):
        driver.select(checks.CHECKS, "qlora")


def _train_argv(argv: list[str]) -> tuple[str, list[str]] | None:
    """(method, key=value overrides) of a `vlmalign train` command line, else None."""
    if "vlmalign" not in argv or "train" not in argv:
        return None
    i = argv.index("train", argv.index("vlmalign"))
    return argv[i + 1], argv[i + 2:]


def test_every_training_check_sets_options_its_method_has(tmp_path):
    ctx = checks.Context(tmp_path, cuda=True, gpu_names=["X", "Y"], mode="full")
    seen = 0
    for c in checks.CHECKS:
        for argv in c.commands(ctx, "python"):
            parsed = _train_argv(argv)
            if parsed is None:
                continue
            method, sets = parsed
            validate_config(load_config(get(method).config, None, sets))
            seen += 1
            if "accelerate.commands.launch" in argv:   # one process per GPU present
                assert argv[argv.index("--num_processes") + 1] == "2", shlex.join(argv)
                assert (ROOT / argv[argv.index("--config_file") + 1]).is_file()
    assert seen == 18   # 8 bf16/fp32 runs (one packed), 8-bit AdamW, 2 QLoRA, 7 sharded launches (FSDP2 x2, ZeRO x5)


def test_cpu_smoke_runs_the_cpu_checks_and_skips_the_rest(tmp_path):
    rc = driver.main(["--out", str(tmp_path), "--cpu-smoke", "--no-install"])
    assert rc == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {r["name"]: r for r in report["checks"]}
    assert status["data"]["status"] == status["sft_tiny_fp32"]["status"] == "pass", status["sft_tiny_fp32"]
    assert status["sft_tiny_fp32"]["details"]["loss"] > 0
    gpu = [c.name for c in checks.CHECKS if c.needs_cuda]
    assert len(gpu) == len(checks.CHECKS) - 2
    assert all(status[n]["reason"] == "skipped: no CUDA (--cpu-smoke)" for n in gpu)


def test_a_zero_checks_checkpoint_must_reload_whole_and_trained(tmp_path):
    """The ZeRO checks' verify: a checkpoint of ZeRO-3 shards (empty tensors), or one training did
    not change, fails; full, finite, moved weights pass."""
    import torch
    from safetensors.torch import save_file
    ctx = checks.Context(tmp_path, cuda=True, gpu_names=["X"], mode="full")
    (tmp_path / "model_05b").mkdir()
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, str(tmp_path / "model_05b" / "model.safetensors"))
    run = tmp_path / "runs" / "zero3_sft"
    ck = run / "checkpoints" / "step-2" / "model"
    ck.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0, "time": 0.1}) + "\n"
                                               for s in (1, 2)))
    verify = checks._saved("zero3_sft")
    for weights, error in (({"a": torch.empty(0), "b": torch.zeros(4)}, "other shapes than the model's"),
                           ({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, "training changed nothing"),
                           ({"a": torch.zeros(2, 3)}, "saved keys differ")):
        save_file(weights, str(ck / "model.safetensors"))
        with pytest.raises(ValueError, match=error):
            verify(ctx)
    save_file({"a": torch.zeros(2, 3), "b": torch.full((4,), 0.5)}, str(ck / "model.safetensors"))
    assert verify(ctx) == {"loss": 1.0, "time_s": 0.1, "tensors": 2, "max_weight_change": 0.5}
