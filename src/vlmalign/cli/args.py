"""What every command's arguments share: range-checked number types, help that shows defaults,
suggestions for mistyped options, and the guard that keeps an output off its inputs."""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path

from ..errors import VlmalignError


def _number(kind, test, text: str):
    def parse(value: str):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {value!r}") from None
        if not test(v):
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be {text})")
        return v
    parse.__name__ = f"{kind.__name__} {text}"
    return parse


positive_int = _number(int, lambda v: v >= 1, ">= 1")
nonneg_int = _number(int, lambda v: v >= 0, ">= 0")
nonneg_float = _number(float, lambda v: v >= 0, ">= 0")
positive_float = _number(float, lambda v: v > 0, "> 0")
at_least_two = _number(int, lambda v: v >= 2, ">= 2")
unit_interval = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")


def config_flags(p, cls, names) -> None:
    """``--NAME`` flags for the options ``names`` of config class ``cls`` (declared there once with
    ``opt``): the flag's default, choices, range and help are the option's. An entry of ``names``
    may be ``(name, "--flag", "--alias", ...)`` for other spellings than ``--name``."""
    from dataclasses import MISSING, fields

    from ..config import ConfigError, parse_option, range_text
    by_name = {f.name: f for f in fields(cls)}
    for entry in names:
        name, *spellings = _spelled(entry)
        f = by_name[name]
        flags = spellings or ["--" + name.replace("_", "-")]
        flag = flags[0]
        default = f.default if f.default is not MISSING else f.default_factory()
        meta = f.metadata
        text = meta.get("help", "")
        if default is False and isinstance(default, bool):
            p.add_argument(*flags, action="store_true", dest=name, help=text)
            continue

        def parse(value: str, _name=name, _flag=flag):
            try:
                return parse_option(cls, _name, value, where=_flag)
            except ConfigError as e:
                msg = str(e).split(": ", 1)[-1]   # the command line's wording for a bad number
                raise argparse.ArgumentTypeError(msg.replace("expected int,", "expected an integer,")
                                                 .replace("expected float,", "expected a number,")) from None
        parse.__name__ = range_text(meta.get("bounds") or {}) or "value"
        choices = meta.get("choices")
        p.add_argument(*flags, type=parse, default=default, dest=name, choices=choices, help=text,
                       metavar=None if choices else name.upper())


def _spelled(entry) -> tuple:
    """``(name, *flag spellings)`` of an entry of :func:`config_flags`' ``names``."""
    return (entry,) if isinstance(entry, str) else tuple(entry)


def config_from_flags(cls, args, names):
    """The config ``cls`` with the options ``names`` from the flags :func:`config_flags` added
    (the others at their defaults), checked."""
    from ..config import validate_config
    cfg = cls(**{n: getattr(args, n) for n in (_spelled(e)[0] for e in names)})
    validate_config(cfg)
    return cfg


def add_limit(p, what: str = "records") -> None:
    p.add_argument("--limit", type=positive_int, default=None, help=f"only the first N {what} (default: all)")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends ``(default: X)`` to options with a default
    worth showing (not None or False, and not already described in the help text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(d, (list, tuple)):
            d = ",".join(map(str, d))
        return f"{text} (default: {d})"


class Parser(argparse.ArgumentParser):
    """Shows defaults in --help, and names the closest valid option for a mistyped one, also
    when argparse stops first at a required option (``generate --modle x`` -> "--modle (did you
    mean --model?)")."""

    argv: list[str] = []  # the command line being parsed (set by the entry point)

    def __init__(self, *a, **k):
        k.setdefault("formatter_class", Formatter)
        super().__init__(*a, **k)

    def error(self, message: str):
        if not message.startswith("unrecognized arguments"):
            known = {s for a in self._actions for s in a.option_strings}
            unknown = [t for t in Parser.argv if t.startswith("--") and t.split("=", 1)[0] not in known]
            if unknown:
                message = f"{unknown_arguments_message(self, unknown)}; {message}"
        super().error(message)


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``args`` selected, e.g. that of ``train sft``."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or getattr(args, subs[0].dest, None) not in subs[0].choices:
            return parser
        parser = subs[0].choices[getattr(args, subs[0].dest)]


def unknown_arguments_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    options = [s for a in parser._actions for s in a.option_strings]
    parts = []
    for e in extras:
        name = e.split("=", 1)[0]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6) if name.startswith("-") else []
        parts.append(f"{e} (did you mean {close[0]}?)" if close else e)
    return "unrecognized arguments: " + " ".join(parts)


def refuse_output_over_input(out: str | os.PathLike, *inputs: str | os.PathLike | None, what: str = "--out",
                             directory: bool = False) -> None:
    """Refuse an output path that is one of the inputs; for a ``directory`` output also one that
    lies inside an input directory or contains it: writing there would destroy what is read."""
    o = Path(out).expanduser().resolve()
    for i in inputs:
        if i is None:
            continue
        src = Path(i).expanduser().resolve()
        same = o == src or (o.exists() and src.exists() and os.path.samefile(o, src))
        nested = directory and (src in o.parents or o in src.parents)
        if same or nested:
            raise VlmalignError(f"{what} {out} would overwrite the input {i}: choose another output path")
