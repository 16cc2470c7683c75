"""What one request may ask of the server; each limit is a ``vlmalign serve`` flag."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import opt


@dataclass
class ServeLimits:
    max_body_bytes: int = opt(20 * 1024 * 1024, "largest request body in bytes (413 above it)", ge=1)
    max_image_pixels: int = opt(4096 * 4096, "most pixels an image may have (width x height, read from its "
                                             "header before decoding)", ge=1)
    max_images: int = opt(8, "most images in one request", ge=0)
    max_prompt_tokens: int = opt(4096, "most prompt tokens, image tokens included", ge=1)
    max_tokens: int = opt(1024, "most tokens a completion may have (cap on max_tokens; a request that "
                                "sets none gets this many)", ge=1)
    max_batch_size: int = opt(8, "most completions generated together in one batch (also the cap on n)", ge=1)
    max_queue: int = opt(64, "most requests waiting for the model (503 above it)", ge=1)


LIMIT_FLAGS = ("max_body_bytes", "max_image_pixels", "max_images", "max_prompt_tokens", "max_tokens",
               "max_batch_size", "max_queue")
