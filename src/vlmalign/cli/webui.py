"""`vlmalign webui`: a web page (Gradio) to chat with a model about images, or with two side by side."""

from __future__ import annotations

import argparse
import logging

from .args import config_flags, config_from_flags, positive_int
from .chat import ChatSampling, add_chat_image_position, chat_image_position
from .generate import SAMPLING, add_model_args, load_for_inference

log = logging.getLogger("vlmalign.webui")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(sub) -> None:
    p = sub.add_parser("webui", help="chat with a model (or compare two) in the browser: a local Gradio page")
    add_model_args(p)
    p.add_argument("--compare", metavar="DIR", help="a second model (directory or LoRA adapter) answering the same "
                                                    "messages beside the first, e.g. the model after DPO")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (any but 127.0.0.1, localhost or ::1 "
                                                       "exposes the page, which has no login, to the network)")
    p.add_argument("--port", type=positive_int, default=7860, help="port to serve on")
    p.add_argument("--image-root", default=None, help="a directory whose images the page offers to pick "
                                                      "(uploads work without it)")
    add_chat_image_position(p)   # with --compare, each model places images its own way
    config_flags(p, ChatSampling, SAMPLING)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..data.images import check_image_root
    from ..webui import ChatModel, WebChat
    from ..webui.app import launch, require_gradio
    require_gradio()   # a missing extra is said before the models load
    check_image_root(args.image_root)
    models = []
    for path in [args.model, *([args.compare] if args.compare else [])]:
        ad = load_for_inference(argparse.Namespace(**{**vars(args), "model": path}))
        models.append(ChatModel(path, ad, chat_image_position(args, path)))
    chat = WebChat(models, config_from_flags(ChatSampling, args, SAMPLING), image_root=args.image_root)
    if args.host not in LOCAL_HOSTS:
        log.warning("serving on %s: anyone who can reach it can use the models (the page has no login)", args.host)
    demo = launch(chat, args.host, args.port)
    print(f"vlmalign webui: {demo.local_url} ({' and '.join(m.name for m in models)}; Ctrl-C stops it)", flush=True)
    demo.block_thread()
    return 0
