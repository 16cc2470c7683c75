"""From a checked request to vlmalign messages: roles, text and image parts, image references
(data: URLs, or paths confined to the image root; nothing is fetched from the network)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from ..data import schema
from ..data.images import resolve_image_path
from ..errors import DataError
from .errors import APIError
from .limits import ServeLimits
from .schemas import UNSUPPORTED, ChatRequest, TextPart


@dataclass
class Params:
    """What the worker needs of a request besides its prompt."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: list[str]
    seed: int | None = None


def check_params(req: ChatRequest, names: list[str], limits: ServeLimits) -> Params:
    if req.model not in names:
        raise APIError(404, f"the model {req.model!r} does not exist: this server serves {names[0]!r} "
                            "(GET /v1/models lists it)", param="model", code="model_not_found")
    for name, off in UNSUPPORTED.items():
        value = getattr(req, name)
        if value not in off:
            raise APIError(400, f"{name}={value!r} is not supported by this server (accepted: "
                                f"{', '.join(repr(o) for o in off)})", param=name, code="unsupported_parameter")
    if req.n > limits.max_batch_size:
        raise APIError(400, f"n={req.n} is over this server's limit of {limits.max_batch_size} (--max-batch-size)",
                       param="n", code="invalid_value")
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = getattr(req, field)
    if asked is not None and asked > limits.max_tokens:
        raise APIError(400, f"{field}={asked} is over this server's limit of {limits.max_tokens} tokens "
                            "(--max-tokens)", param=field, code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop: up to 4 non-empty strings", param="stop", code="invalid_value")
    return Params(req.n, req.temperature, req.top_p, asked or limits.max_tokens, stop, req.seed)


def to_messages(req: ChatRequest, image_root: str | None, limits: ServeLimits, placeholder: str):
    """The request's messages as vlmalign Messages, and (image, its request param) in order."""
    out, images = [], []
    for i, m in enumerate(req.messages):
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        content = []
        for j, part in enumerate(parts):
            param = f"messages.{i}.content" + ("" if isinstance(m.content, str) else f".{j}")
            if part.type == "text":
                if placeholder and placeholder in part.text:
                    raise APIError(400, f"{param}: {placeholder!r} is this model's image placeholder; send images "
                                        "as image_url parts", param=param, code="invalid_value")
                content.append(schema.TextPart(part.text))
                continue
            if m.role != "user":
                raise APIError(400, f"{param}: images are accepted in user messages only, not {m.role}",
                               param=param, code="invalid_value")
            url_param = param + ".image_url.url"
            images.append((image_ref(part.image_url.url, image_root, url_param), url_param))
            if len(images) > limits.max_images:
                raise APIError(400, f"more than {limits.max_images} images in the request (--max-images)",
                               param="messages", code="too_many_images")
            content.append(schema.ImagePart(images[-1][0]))
        out.append(schema.Message("system" if m.role == "developer" else m.role, content))
    return out, images


def image_ref(url: str, root: str | None, param: str) -> schema.ImageRef:
    """A data: URL's bytes, or a local path (``file://`` or plain) that lies under ``root``."""
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise APIError(400, f"{param}: a data: URL must be base64 (data:image/png;base64,...)",
                           param=param, code="invalid_image_url")
        try:
            return schema.ImageRef(data=base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{param}: the data: URL is not valid base64 ({e})", param=param,
                           code="invalid_image_url") from None
    scheme = urlparse(url).scheme
    if scheme not in ("", "file") and len(scheme) > 1:   # len 1: a Windows drive letter
        raise APIError(400, f"{param}: {scheme}: URLs are not fetched; send the image as a data: URL or as a "
                            "path under the server's image root", param=param, code="invalid_image_url")
    path = unquote(urlparse(url).path) if scheme == "file" else url
    if root is None:
        raise APIError(400, f"{param}: local image paths are off: the server was started without --image-root",
                       param=param, code="invalid_image_url")
    try:
        return schema.ImageRef(path=str(resolve_image_path(path, root)))
    except DataError as e:
        raise APIError(400, f"{param}: {e.reason}", param=param, code="image_outside_root") from None
