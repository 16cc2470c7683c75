"""Runs test_compose_timm.py in the timm side environment (timm_env.py): a pytest process with the
side folder of timm and torchvision on its path. Skipped where that folder is missing (``make
setup-dev`` installs it: scripts/install_timm_site.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from timm_env import INNER, REPO, SITE


def test_timm_towers_in_the_side_environment(tmp_path):
    if not (SITE / "timm").is_dir() or not (SITE / "torchvision").is_dir():
        pytest.skip(f"{SITE} holds no timm and torchvision: make setup-dev installs them "
                    "(scripts/install_timm_site.sh)")
    here = Path(__file__).parent
    env = {**os.environ, INNER: "1", "PYTHONPATH": os.pathsep.join(
        [str(SITE), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    report = tmp_path / "report.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                           f"--junitxml={report}", str(here / "test_compose_timm.py")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    counts = ET.parse(report).getroot().find("testsuite").attrib
    # the contract tests on two compositions and the module's own tests, none skipped
    assert int(counts["tests"]) >= 53, counts
    assert counts["failures"] == counts["errors"] == counts["skipped"] == "0", (counts, tail)


def test_a_timm_directory_without_timm_is_a_clear_error(tmp_path):
    """In an environment without timm (this one), a timm model directory is refused by name."""
    import torch
    from safetensors.torch import save_file

    from vlmalign.errors import ModelError
    from vlmalign.models.compose import compose
    (tmp_path / "tower").mkdir()
    (tmp_path / "tower" / "config.json").write_text(
        '{"architecture": "test_efficientnet", "model_type": "timm_wrapper", "num_classes": 0}')
    save_file({"timm_model.conv_stem.weight": torch.zeros(1)}, str(tmp_path / "tower" / "model.safetensors"))
    with pytest.raises(ModelError, match=r"--vision .*tower: TimmWrapperConfig requires the timm library .*pip install timm"):
        compose(str(tmp_path / "tower"), str(tmp_path / "lm"), str(tmp_path / "out"))
