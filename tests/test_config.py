"""sae_fast.config.build: every value is type- and range-checked, all problems reported at once, one a line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from sae_fast.config import add_arguments, build, from_args, option
from sae_fast.errors import UserError


@dataclass
class Cfg:
    """A test config."""

    n: int = option(3, "a count", bounds="[1, inf)")
    rate: float = option(0.5, "a rate", bounds="(0, 1]")
    name: str = option("a", "a name", choices=("a", "b"))
    flag: bool = option(False, "a flag")
    where: Path | None = option(None, "a path")
    sizes: list[int] = option(default_factory=list, help="sizes", bounds="[1, inf)")
    limit: int | None = option(None, "an optional limit")


def test_values_are_converted_only_where_lossless():
    cfg = build(Cfg, {"n": 4, "rate": 1, "where": "x/y", "sizes": (2, 3), "limit": None})
    assert cfg.rate == 1.0 and isinstance(cfg.rate, float) and cfg.where == Path("x/y") and cfg.sizes == [2, 3]


@pytest.mark.parametrize("values,message", [
    ({"n": "3"}, "n = '3': expected an integer (without quotes)"),
    ({"n": 3.0}, "n = 3.0: expected an integer"),
    ({"n": True}, "n = True: expected an integer"),
    ({"n": 0}, "n = 0: must be >= 1"),
    ({"rate": 0}, "rate = 0.0: must be > 0 and <= 1"),
    ({"rate": "0.1"}, "rate = '0.1': expected a number (without quotes)"),
    ({"name": "c"}, "name = 'c'; choose one of ['a', 'b']"),
    ({"flag": "yes"}, "flag = 'yes': expected true or false"),
    ({"where": 3}, "where = 3: expected a path"),
    ({"sizes": [1, "2"]}, "sizes = [1, '2']: expected a list of integers"),
    ({"sizes": [1, 0]}, "sizes = [1, 0]: must be >= 1"),
    ({"limit": 2.5}, "limit = 2.5: expected an integer"),
    ({"size": 1}, "unknown option(s) job.size; valid: flag, limit, n, name, rate, sizes, where"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(UserError) as e:
        build(Cfg, values, where="job")
    assert str(e.value) == (message if message.startswith("unknown") else f"job.{message}")


def test_all_problems_at_once():
    with pytest.raises(UserError) as e:
        build(Cfg, {"n": 0, "rate": 2.0, "name": "z", "x": 1}, where="s")
    assert len(str(e.value).splitlines()) == 4


def test_cli_flags_are_checked_and_named():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Cfg)
    assert "a rate (default: 0.5) (> 0 and <= 1)" in " ".join(parser.format_help().split())
    with pytest.raises(UserError, match=r"^--n = 0: must be >= 1$"):
        from_args(Cfg, parser.parse_args(["--n", "0"]))
    base = build(Cfg, {"n": 5})
    assert from_args(Cfg, parser.parse_args(["--rate", "0.25"]), base=base) == Cfg(n=5, rate=0.25)
