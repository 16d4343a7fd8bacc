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


def test_resume_message_honours_quiet(tmp_path, monkeypatch, capsys):
    """An interrupted extraction's resume note is a progress line: shown by default, silent under -q."""
    import sae_fast
    from sae_fast import utils

    model = sae_fast.load_model("mini")
    adata = sae_fast.datasets.pbmc_demo()[:4].copy()
    forward = model.forward

    def interrupted(out):
        """Extract into `out`, killed (KeyboardInterrupt) in the second forward batch."""
        calls = []

        def dying_forward(*a, **kw):
            calls.append(1)
            if len(calls) > 1:
                raise KeyboardInterrupt
            return forward(*a, **kw)

        monkeypatch.setattr(model, "forward", dying_forward)
        with pytest.raises(KeyboardInterrupt):
            sae_fast.extract(model, adata, 1, out, batch_size=2, shard_tokens=1)
        monkeypatch.setattr(model, "forward", forward)
        return out

    for verbosity, shown in [(0, False), (1, True)]:
        out = interrupted(tmp_path / f"acts{verbosity}")
        monkeypatch.setattr(utils, "VERBOSITY", verbosity)
        capsys.readouterr()
        assert len(sae_fast.extract(model, adata, 1, out, batch_size=2, shard_tokens=1, resume=True)) > 0
        assert ("resuming extraction" in capsys.readouterr().out) == shown
