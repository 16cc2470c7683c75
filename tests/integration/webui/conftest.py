"""Tiny random-init LLaVA models and a drawn PNG for the web demo's tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw

from vlmalign.models import save_tiny
from vlmalign.models.peft import load_any


@pytest.fixture(scope="package")
def tiny(tmp_path_factory):
    """Two tiny LLaVA models (different seeds: "before" and "after"), loaded as the CLI loads them,
    and a PNG of a red square on white drawn with PIL."""
    root = tmp_path_factory.mktemp("webui")
    dirs = [save_tiny("llava", str(root / name), seed=seed) for name, seed in (("before", 0), ("after", 1))]
    ads = [load_any(d) for d in dirs]
    for ad in ads:
        ad.model.to("cpu").eval()
    img = Image.new("RGB", (48, 40), "white")
    ImageDraw.Draw(img).rectangle([6, 6, 30, 30], fill=(220, 20, 20))
    img.save(root / "square.png")
    return SimpleNamespace(root=root, dirs=dirs, adapters=ads, image=str(root / "square.png"))
