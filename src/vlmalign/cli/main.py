"""`vlmalign` entry point. Each command group lives in its own module with a
``register(subparsers)`` function; commands are thin: parse, call the library."""

from __future__ import annotations

import importlib
import sys

from ..errors import VlmalignError
from .args import Parser, command_parser, unknown_arguments_message

# module name under vlmalign.cli -> registers one or more top-level commands
COMMAND_MODULES = ("data", "models", "train", "eval", "generate", "chat", "serve", "export", "quickstart", "score",
                   "generate_preferences", "merge", "webui")


def build_parser() -> Parser:
    parser = Parser(prog="vlmalign", description="Align vision-language models.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"vlmalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        mod = importlib.import_module(f"{__package__}.{name}")
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    Parser.argv = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        command_parser(parser, args).error(unknown_arguments_message(command_parser(parser, args), extras))
    from ..logsetup import configure_logging
    configure_logging()
    try:
        rc = args.func(args)
    except VlmalignError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    return int(rc or 0)


def _close_process_group() -> None:
    """Leave a distributed run cleanly (an open gloo group at exit can abort the interpreter)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
