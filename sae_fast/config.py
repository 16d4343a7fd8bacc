"""Dataclass configs whose field docs become the CLI help.

Declare a field with `option(default, "what it means")`; `add_arguments(parser, Cls)` turns every field into a
`--flag` with that help and its default, and `from_args(Cls, namespace)` builds the dataclass back. The same
dataclasses are the sections of a run's TOML config (`load_toml`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from sae_fast.errors import UserError


def option(default=dataclasses.MISSING, help: str = "", *, choices=None, default_factory=dataclasses.MISSING):
    """A dataclass field carrying its CLI help (and optional choices)."""
    meta = {"help": help, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


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
        kw = dict(dest=prefix + f.name, default=argparse.SUPPRESS,
                  help=f"{help_} (default: {default!r})" if help_ else f"(default: {default!r})")
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            group.add_argument(flag, nargs="+", type=inner, **kw)
        else:
            group.add_argument(flag, type=tp if tp in (int, float, str) else str, choices=choices, **kw)


def from_args(cls, ns: argparse.Namespace | dict, base=None, *, prefix: str = ""):
    """Build `cls` from parsed arguments, starting from `base` (an instance) or the defaults."""
    values = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns)
    given = {f.name: values[prefix + f.name] for f in dataclasses.fields(cls) if prefix + f.name in values}
    return dataclasses.replace(base, **given) if base is not None else build(cls, given)


def build(cls, values: dict, *, where: str = ""):
    """Construct `cls` from a dict, rejecting unknown keys with a message that lists the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{where or cls.__name__}: unknown option(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(names))}")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if f.name in values and choices and values[f.name] not in choices:
            raise UserError(f"{where or cls.__name__}.{f.name} = {values[f.name]!r}; choose one of {choices}")
        if f.name in values and _base_type(hints[f.name]) is Path and values[f.name] is not None:
            values[f.name] = Path(values[f.name])
    return cls(**values)


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
