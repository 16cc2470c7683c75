"""`vlmalign` entry point. Each command group lives in its own module with a
``register(subparsers)`` function; commands are thin: parse, call the library."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import VlmalignError

# module name under vlmalign.cli -> registers one or more top-level commands
COMMAND_MODULES = ("data", "models", "train", "generate", "chat", "export", "quickstart", "score",
                   "generate_preferences")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmalign", description="Align vision-language models.")
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
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except VlmalignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
