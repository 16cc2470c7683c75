"""`vlmalign chat`: multi-round terminal chat with streamed output."""

from __future__ import annotations

from ..config import with_defaults
from ..rollout.chat import ChatSession
from ..rollout.generate import SamplingConfig
from .args import config_flags
from .generate import SAMPLING, add_model_args, load_for_inference

ChatSampling = with_defaults(SamplingConfig, "ChatSampling", max_new_tokens=256)

COMMANDS = {
    "/image": "/image PATH   show an image with your next message",
    "/reset": "/reset        forget the conversation (and pending images)",
    "/help": "/help         this help",
    "/quit": "/quit         leave (Ctrl-D works too; Ctrl-C stops an answer or clears the line)",
}
HELP = "commands:\n" + "\n".join(f"  {v}" for v in COMMANDS.values()) + \
    "\n  (start a message with // to send text that begins with /)"


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (streamed output)")
    add_model_args(p)
    p.add_argument("--image", help="image to start the conversation with")
    p.add_argument("--image-root", default=None, help="directory images must lie in (default: anywhere "
                                                      "under the current directory)")
    add_chat_image_position(p)
    config_flags(p, ChatSampling, SAMPLING)
    p.set_defaults(func=_run)


def add_chat_image_position(p) -> None:
    """``--image-position`` of the commands that chat (chat, webui)."""
    p.add_argument("--image-position", choices=("auto", "before", "after"), default="auto",
                   help="where a message's images go relative to its text; auto: as in the prompts the model "
                        "was trained on (its vlmalign_prompt.json), else before")


def chat_image_position(args, model: str) -> str:
    """Where ``model``'s messages put their images, by ``--image-position``."""
    from ..models.prompt_layout import model_image_position
    return model_image_position(model) if args.image_position == "auto" else args.image_position


def _run(args) -> int:
    ad = load_for_inference(args)
    position = chat_image_position(args, args.model)
    s = ChatSession(ad, args.image_root, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                    image_position=position)
    if args.image:
        s.add_image(args.image)
    print(f"vlmalign chat ({ad.family}; images go {position} your text). /help for commands.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-C: line cleared; /quit or Ctrl-D leaves)")
            continue
        if line and not _command(s, line):
            _turn(s, line[1:] if line.startswith("//") else line)
        if line in ("/quit", "/exit"):
            return 0


def _command(s: ChatSession, line: str) -> bool:
    """Run ``line`` if it is a command (True), or say it is none; False: a message to send."""
    import difflib

    from ..errors import VlmalignError
    if not line.startswith("/") or line.startswith("//"):
        return False
    name, _, rest = line.partition(" ")
    if name in ("/quit", "/exit"):
        return True
    if name == "/help":
        print(HELP)
    elif name == "/reset":
        s.reset()
        print("(conversation reset)")
    elif name == "/image":
        try:
            s.add_image(rest.strip())
            print(f"(image {rest.strip()} will be shown with your next message)")
        except VlmalignError as e:
            print(f"error: {e}")
    else:
        close = difflib.get_close_matches(name, [*COMMANDS, "/exit"], n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"unknown command {name}{hint}: nothing was sent; /help lists the commands, "
              "// starts a message with /")
    return True


def _turn(s: ChatSession, text: str) -> None:
    from ..errors import VlmalignError
    print("model> ", end="", flush=True)
    try:
        s.ask(text)
    except VlmalignError as e:
        print(f"\nerror: {e}")
    except KeyboardInterrupt:
        print("\n(answer stopped; the conversation is as before that message)")
