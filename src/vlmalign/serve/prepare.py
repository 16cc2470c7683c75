"""A request's images loaded and its prompt tokenized, before it is queued: a bad image or an
over-long prompt is a 400 that names the limit, and the worker gets inputs ready to batch."""

from __future__ import annotations

from ..data.batching import ImageLoader
from ..errors import LengthError, VlmalignError
from ..rollout.generate import prompt_example
from .errors import APIError
from .limits import ServeLimits
from .worker import GivenImages


def prepare(adapter, msgs, images, image_root: str | None, limits: ServeLimits):
    """(prompt example, {image key: preprocessed inputs}) for ``msgs`` and its ``images``
    (``(ImageRef, request param)`` pairs)."""
    loader = ImageLoader(adapter, image_root, cache_size=max(1, len(images)), max_pixels=limits.max_image_pixels)
    inputs = {}
    for ref, param in images:
        try:
            inputs[ref.key()] = loader.inputs(ref)
        except VlmalignError as e:
            big = "pixels" in str(e) and "over" in str(e)
            limit = f" (this server's limit: --max-image-pixels {limits.max_image_pixels:,})" if big else ""
            raise APIError(400, f"{param}: {getattr(e, 'reason', e)}{limit}", param=param,
                           code="image_too_large" if big else "invalid_image") from None
    try:
        example = prompt_example(adapter, msgs, GivenImages(inputs), max_length=limits.max_prompt_tokens)
    except LengthError as e:
        raise APIError(400, f"messages: {e.reason.replace('max_length', 'this server limit --max-prompt-tokens')}",
                       param="messages", code="context_length_exceeded") from None
    except VlmalignError as e:
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
    return example, inputs
