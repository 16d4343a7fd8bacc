"""Dataclass configs whose field docs become the CLI help.

Declare a field with `option(default, "what it means")`; `add_arguments(parser, Cls)` turns every field into a
`--flag` with that help and its default, and `from_args(Cls, namespace)` builds the dataclass back. The same
dataclasses are the sections of a run's TOML config (`load_toml`).
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import os
import types
import typing
from pathlib import Path

from sae_fast.errors import UserError


def option(default=dataclasses.MISSING, help: str = "", *, choices=None, bounds: str | None = None,
           default_factory=dataclasses.MISSING):
    """A dataclass field carrying its CLI help, optional choices, and optional bounds: an interval such as
    "(0, inf)", "[1, inf)" or "(0, 1]" that `build` enforces (with the type) on every value it is given."""
    meta = {"help": help, "choices": choices, "bounds": _parse_bounds(bounds) if bounds else None}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _parse_bounds(text: str) -> tuple[float, bool, float, bool]:
    """'(0, 1]' -> (0.0, False, 1.0, True): low, low included, high, high included."""
    low, high = (float(x) for x in text.strip()[1:-1].split(","))
    return low, text.strip()[0] == "[", high, text.strip()[-1] == "]"


def _bounds_text(bounds) -> str:
    low, low_in, high, high_in = bounds
    parts = []
    if low != float("-inf"):
        parts.append(f"{'>=' if low_in else '>'} {low:g}")
    if high != float("inf"):
        parts.append(f"{'<=' if high_in else '<'} {high:g}")
    return " and ".join(parts)


def _base_type(tp):
    """int | None -> int; Optional[str] -> str; leaves plain types alone."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _hints(cls):
    return typing.get_type_hints(cls)


def add_arguments(parser: argparse.ArgumentParser, cls, *, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Add one `--field` per dataclass field of `cls`, with the field's help, type, choices and default."""
    hints = _hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options", (cls.__doc__ or "").strip().split("\n")[0])
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag = "--" + (prefix + f.name).replace("_", "-")
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        bounds = f" ({_bounds_text(f.metadata['bounds'])})" if f.metadata.get("bounds") else ""
        kw = dict(dest=prefix + f.name, default=argparse.SUPPRESS,
                  help=f"{help_} (default: {default!r}){bounds}" if help_ else f"(default: {default!r}){bounds}")
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            group.add_argument(flag, nargs="+", type=inner, **kw)
        else:
            group.add_argument(flag, type=tp if tp in (int, float, str) else str, choices=choices, **kw)


def from_args(cls, ns: argparse.Namespace | dict, base=None, *, prefix: str = ""):
    """Build `cls` from parsed arguments, starting from `base` (an instance) or the defaults; values are checked
    as in `build`, with errors naming the --flag."""
    values = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns)
    given = {f.name: values[prefix + f.name] for f in dataclasses.fields(cls) if prefix + f.name in values}
    if base is not None:
        given = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}, **given}
    return build(cls, given, flags=True)


_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans", Path: "paths"}


def _check_type(value, tp):
    """`value` as type `tp` (int, float, str, bool, Path, list[T], T | None), or raise ValueError(expected)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(" or ".join(errors))
    if origin in (list, tuple):
        inner = (typing.get_args(tp) or (str,))[0]
        try:
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [_check_type(v, inner) for v in value]
        except ValueError:
            raise ValueError(f"a list of {_PLURALS.get(inner, 'values')}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError("an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError("a string")
        return value
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError("a path")
        return Path(value)
    return value


def build(cls, values: dict, *, where: str = "", flags: bool = False):
    """Construct `cls` from a dict, checking every key: unknown keys (the message lists the valid ones), types
    (TOML `"32"` for an integer is refused, not converted), choices and bounds. All problems are reported
    together, one line each, naming `WHERE.key` (or the `--flag` with flags=True)."""
    names = [f.name for f in dataclasses.fields(cls)]
    where = where or cls.__name__

    def key(name):
        return "--" + name.replace("_", "-") if flags else f"{where}.{name}"

    errors = []
    unknown = sorted(set(values) - set(names))
    if unknown:
        errors.append(f"unknown option(s) {', '.join(map(key, unknown))}; valid: {', '.join(sorted(names))}")
    hints = _hints(cls)
    checked = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        try:
            value = _check_type(value, hints[f.name])
        except ValueError as e:
            hint = " (without quotes)" if isinstance(value, str) and str(e) in ("an integer", "a number") else ""
            errors.append(f"{key(f.name)} = {value!r}: expected {e}{hint}")
            continue
        choices = f.metadata.get("choices")
        if choices and not all(v in choices for v in (value if isinstance(value, list) else [value])):
            errors.append(f"{key(f.name)} = {value!r}; choose one of {list(choices)}")
            continue
        bounds = f.metadata.get("bounds")
        if bounds and value is not None:
            low, low_in, high, high_in = bounds
            for v in value if isinstance(value, list) else [value]:
                if not ((low <= v if low_in else low < v) and (v <= high if high_in else v < high)):
                    errors.append(f"{key(f.name)} = {value!r}: must be {_bounds_text(bounds)}")
                    break
        checked[f.name] = value
    if errors:
        raise UserError("\n".join(errors))
    return cls(**checked)


def options_table(cls) -> str:
    """The Markdown table of `cls`'s options as the CLI shows them (flag, default, help, choices, bounds): what
    docs/*.md embed, so the docs say exactly what the code does (tests compare them)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meaning = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            meaning += f" (one of: {', '.join(f.metadata['choices'])})"
        if f.metadata.get("bounds"):
            meaning += f" ({_bounds_text(f.metadata['bounds'])})"
        flag = "--" + f.name.replace("_", "-")
        rows.append(f"| `{flag}` | `{default!r}` | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def load_toml(path: str | Path) -> dict:
    """Read a TOML file, with a one-line error naming the file on failure."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None


def to_dict(obj) -> dict:
    """A dataclass as a plain, JSON/TOML-friendly dict (Paths become strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(obj).items()}
