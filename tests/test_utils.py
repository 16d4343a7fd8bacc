"""sae_fast.utils: atomic writes leave either the old file or the whole new one, with open()'s permissions."""

from __future__ import annotations

import os

import pytest

from sae_fast.utils import atomic_path, write_json


def test_atomic_path_renames_only_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]  # no temporary left behind


def test_atomic_files_get_the_permissions_open_would_give(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    (tmp_path / "b.json").write_text("{}")
    mode = lambda p: os.stat(p).st_mode & 0o777
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.json")
