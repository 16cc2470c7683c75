"""What the web demo's tests share: the question they ask, the answer length, and the answer the
library's batch generation gives, which the page must show."""

from __future__ import annotations

from pathlib import Path

from vlmalign.data.batching import ImageLoader
from vlmalign.data.schema import ImageRef, Message
from vlmalign.rollout.generate import SamplingConfig, generate

MAX_NEW = 8   # tokens per answer: enough to see streaming, quick on a CPU
QUESTION = "What colour is the square?"


def library_answer(ad, image: str | None, text: str, max_new_tokens: int = MAX_NEW) -> str:
    """The greedy answer of ``vlmalign generate``'s batch generation to one user message."""
    parts = (ImageRef(data=Path(image).read_bytes()), text) if image else (text,)
    loader = ImageLoader(ad, None)
    return generate(ad, [[Message.user(*parts)]], loader, SamplingConfig(max_new_tokens=max_new_tokens))[0][0]
