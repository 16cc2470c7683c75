"""Tiny random-init LLaVA models and a drawn PNG for the web demo's tests, and the answer the
library's batch generation gives, which the page must show."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw

from vlmalign.data.batching import ImageLoader
from vlmalign.data.schema import ImageRef, Message
from vlmalign.models import save_tiny
from vlmalign.models.peft import load_any
from vlmalign.rollout.generate import SamplingConfig, generate

MAX_NEW = 8   # tokens per answer: enough to see streaming, quick on a CPU
QUESTION = "What colour is the square?"


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


def library_answer(ad, image: str | None, text: str, max_new_tokens: int = MAX_NEW) -> str:
    """The greedy answer of ``vlmalign generate``'s batch generation to one user message."""
    parts = (ImageRef(data=open(image, "rb").read()), text) if image else (text,)
    loader = ImageLoader(ad, None)
    return generate(ad, [[Message.user(*parts)]], loader, SamplingConfig(max_new_tokens=max_new_tokens))[0][0]
