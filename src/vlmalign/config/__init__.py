"""Configuration: dataclasses with one field per option and its help text; YAML + dotted overrides.

    cfg = load_config(SFTConfig, "recipes/llava/sft.yaml", ["optim.lr=1e-4", "train.max_steps=50"])

Every option is declared once (``opt(default, help)``); ``describe(cls)`` renders the help that
``vlmalign train X --help`` prints. Unknown keys are rejected with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import VlmalignError


class ConfigError(VlmalignError):
    pass


def opt(default: Any, help: str, choices: tuple | None = None, *, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None):
    """A config option: default value, help text, optional allowed values and an optional range
    (``ge`` / ``gt`` / ``le`` / ``lt`` bounds, checked for every number the option is given,
    each element of a list; ``None`` stays allowed where the type allows it)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"help": help, "choices": choices, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, help: str):
    return field(default_factory=cls, metadata={"help": help, "choices": None})


def with_defaults(base, name: str, **defaults):
    """A subclass of the section ``base`` named ``name`` whose options ``defaults`` start at other
    values; help, choices and range stay those of ``base``. A method declares its own defaults
    this way (``DPOOptim = with_defaults(OptimSection, "DPOOptim", lr=5e-6)``), so the class is
    the whole truth: ``--help`` and a run read the same defaults."""
    own = {f.name: f for f in fields(base)}
    hints = _hints(base)
    ns: dict[str, Any] = {"__annotations__": {}, "__module__": base.__module__,
                          "__doc__": f"{base.__name__} with the defaults {defaults}"}
    for key, value in defaults.items():
        if key not in own:
            raise _unknown(key, list(own), f"{base.__name__}.")
        meta = own[key].metadata
        ns["__annotations__"][key] = hints[key]
        ns[key] = opt(value, meta["help"], meta.get("choices"), **(meta.get("bounds") or {}))
    cls = dataclass(type(name, (base,), ns))
    validate_config(cls())
    return cls


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b,
             "lt": lambda v, b: v < b}


def range_text(bounds: dict) -> str:
    """``bounds`` as the help shows them, e.g. ``>= 1``, or an interval: ``in [0, 1)``."""
    lo = [k for k in bounds if k in ("ge", "gt")]
    hi = [k for k in bounds if k in ("le", "lt")]
    if len(bounds) == 2 and lo and hi:
        return (f"in {'[' if lo[0] == 'ge' else '('}{bounds[lo[0]]:g}, "
                f"{bounds[hi[0]]:g}{']' if hi[0] == 'le' else ')'}")
    return ", ".join(f"{_BOUND_TEXT[k]} {b:g}" for k, b in bounds.items())


def check_bounds(value: Any, bounds: dict, where: str) -> None:
    """Refuse a number (or any number in a list) outside the option's declared range."""
    if not bounds or value is None:
        return
    for i, v in enumerate(value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        for k, b in bounds.items():
            if not _BOUND_OK[k](v, b):
                at = f"{where}[{i}]" if isinstance(value, (list, tuple)) else where
                raise ConfigError(f"{at}: {v!r} is out of range (must be {range_text(bounds)})")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce YAML/CLI values to the declared type (str -> int/float/bool/list)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(errs[0] if errs else f"{where}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            v = tp(value) if not (tp is int and isinstance(value, float) and not value.is_integer()) else None
        except (TypeError, ValueError):
            v = None
        if v is None:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return v
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [(_coerce(v, inner, f"{where}[{i}]") if inner is not Any else v) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def parse_option(cls, name: str, value: Any, where: str | None = None) -> Any:
    """``value`` (e.g. a command-line string) as option ``name`` of config class ``cls``: coerced
    to its type, checked against its choices and range (ConfigError naming ``where``)."""
    f = next((f for f in fields(cls) if f.name == name), None)
    if f is None:
        raise _unknown(name, [f.name for f in fields(cls)], "")
    where = where or name
    v = _coerce(value, _hints(cls)[name], where)
    choices = f.metadata.get("choices")
    if choices and v not in choices:
        raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, choices))}")
    check_bounds(v, f.metadata.get("bounds") or {}, where)
    return v


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown option {where + key!r}{hint}")


def _apply(obj, data: dict, prefix: str = "") -> None:
    hints = _hints(type(obj))
    names = [f.name for f in fields(obj)]
    for key, value in data.items():
        if key not in names:
            raise _unknown(key, names, prefix)
        cur = getattr(obj, key)
        if is_dataclass(cur):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix + key}: expected a section (mapping), got {value!r}")
            _apply(cur, value, prefix + key + ".")
        else:
            f = next(f for f in fields(obj) if f.name == key)
            v = _coerce(value, hints[key], prefix + key)
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                raise ConfigError(f"{prefix + key}: {v!r} is not one of {', '.join(map(str, choices))}")
            check_bounds(v, f.metadata.get("bounds") or {}, prefix + key)
            setattr(obj, key, v)


def check_template(template: str, fields, what: str = "judge template") -> None:
    """A ``str.format`` template that may use only the placeholders ``fields``: anything else, or
    a malformed template, is a ConfigError naming the allowed ones."""
    try:
        template.format(**{f: "x" for f in fields})
    except KeyError as e:
        raise ConfigError(f"{what} uses {{{e.args[0]}}}; it may use only "
                          f"{', '.join('{' + f + '}' for f in fields)} (double literal braces: {{{{ }}}})") from None
    except (IndexError, ValueError) as e:
        raise ConfigError(f"{what} is not a valid format string ({e})") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    k, v = item.split("=", 1)
    return k.strip().split("."), yaml.safe_load(v) if v.strip() else ""


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, *, base=None):
    """Defaults (``base`` or ``cls()``) <- YAML file <- dotted ``key=value`` overrides, type-checked."""
    cfg = base if base is not None else cls()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            _apply(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for item in overrides or []:
        keys, value = parse_override(item)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested)
    return cfg


def flat_options(cfg, prefix: str = "") -> dict:
    """``{"section.key": value}`` for every option of a config (sections walked, values as set)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            out.update(flat_options(v, prefix + f.name + "."))
        else:
            out[prefix + f.name] = v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def validate_config(cfg, prefix: str = "") -> None:
    """Check every option of a config built in Python (not only those read from YAML or the
    command line) against its declared choices and range, then each section's and the config's
    own ``check()`` (the rules that relate several options), innermost first."""
    for f in fields(cfg):
        cur = getattr(cfg, f.name)
        if is_dataclass(cur):
            validate_config(cur, prefix + f.name + ".")
            continue
        choices = f.metadata.get("choices")
        if choices and cur not in choices:
            raise ConfigError(f"{prefix + f.name}: {cur!r} is not one of {', '.join(map(str, choices))}")
        check_bounds(cur, f.metadata.get("bounds") or {}, prefix + f.name)
    if hasattr(cfg, "check"):
        cfg.check()


def describe(cls, prefix: str = "") -> list[str]:
    """One line per option: ``section.key (default): help``."""
    lines = []
    obj = cls()
    for f in fields(obj):
        cur = getattr(obj, f.name)
        if is_dataclass(cur):
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            lines.extend(describe(type(cur), prefix + f.name + "."))
        else:
            ch = f.metadata.get("choices")
            extra = f" [{'|'.join(map(str, ch))}]" if ch else ""
            if f.metadata.get("bounds"):
                extra += f" ({range_text(f.metadata['bounds'])})"
            lines.append(f"  {prefix}{f.name} = {cur!r}{extra}: {f.metadata.get('help', '')}")
    return lines


__all__ = ["ConfigError", "check_bounds", "dataclass", "describe", "flat_options", "load_config", "opt", "parse_option", "save_config", "section", "to_dict", "validate_config",
           "with_defaults"]
