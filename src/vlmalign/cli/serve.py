"""`vlmalign serve`: an OpenAI-compatible HTTP server (docs/SERVING.md)."""

from __future__ import annotations

import os

from .args import config_flags, config_from_flags, positive_int
from .generate import add_model_args, load_for_inference

API_KEY_ENV = "VLMALIGN_API_KEY"


def register(sub) -> None:
    from ..serve.limits import LIMIT_FLAGS, ServeLimits
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 opens it to the network: "
                                                       "set an API key)")
    p.add_argument("--port", type=positive_int, default=8000, help="port to listen on")
    p.add_argument("--model-name", default=None, help="the name clients send as `model` (default: the model "
                                                      "directory's name)")
    p.add_argument("--image-root", default=None, help="directory that image paths in requests must lie in "
                                                      "(default: none; only data: URLs are accepted)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: the {API_KEY_ENV} "
                                                   "environment variable; unset: no key)")
    config_flags(p, ServeLimits, LIMIT_FLAGS)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from PIL import Image

    from ..data.images import check_image_root
    from ..errors import VlmalignError
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        raise VlmalignError(f"vlmalign serve needs FastAPI and uvicorn ({e}): pip install 'vlmalign[serve]'") from None
    from ..serve.limits import LIMIT_FLAGS, ServeLimits
    limits = config_from_flags(ServeLimits, args, LIMIT_FLAGS)
    check_image_root(args.image_root)
    # PIL's own decompression-bomb guard at our limit too (we refuse from the header before it)
    Image.MAX_IMAGE_PIXELS = min(Image.MAX_IMAGE_PIXELS or limits.max_image_pixels, limits.max_image_pixels)
    ad = load_for_inference(args)
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(ad, name, image_root=args.image_root, api_key=key, limits=limits)
    print(f"serving {name} ({ad.family}) on http://{args.host}:{args.port}/v1 "
          f"({'API key required' if key else 'no API key'}; images: "
          f"{'data: URLs and paths under ' + args.image_root if args.image_root else 'data: URLs only'})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
