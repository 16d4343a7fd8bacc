"""sae_fast.utils: atomic writes leave either the old file or the whole new one, with open()'s permissions."""

from __future__ import annotations

import json
import os

import numpy as np
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
    adata = sae_fast.datasets.pbmc3k()[:4].copy()
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


def _strict(text: str):
    """json.loads that refuses NaN / Infinity, as strict JSON readers do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_writers_write_undefined_numbers_as_null(tmp_path):
    """NaN is not JSON: write_json and the run log write null for every non-finite float, numpy's included,
    and keep finite numpy floats as numbers."""
    from sae_fast.run.folder import RunFolder

    obj = {"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": {"d": np.float32("nan")},
           "e": np.float32(0.25), "f": np.float64(-2.0), "g": (np.nan, 3), "h": "nan"}
    want = {"a": None, "b": [1.5, None, None], "c": {"d": None}, "e": 0.25, "f": -2.0, "g": [None, 3], "h": "nan"}
    write_json(tmp_path / "x.json", obj)
    assert _strict((tmp_path / "x.json").read_text()) == want
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.mark_done("steer", 1.0, gap_binom_p_up=np.nan, gap_median_gap=np.float64("nan"), n_changed=2)
    folder.log("stage_done", stage="steer", gap_binom_p_up=np.nan)
    assert _strict(folder.state_path.read_text())["done"]["steer"] == {
        "seconds": 1.0, "gap_binom_p_up": None, "gap_median_gap": None, "n_changed": 2}
    assert _strict(folder.log_path.read_text())["gap_binom_p_up"] is None


def test_steer_summary_reads_null_gap_numbers(tmp_path):
    """Undefined gap numbers (no gene moved: null in steer_summary.json) print as n/a."""
    from sae_fast.run.folder import RunFolder
    from sae_fast.run.steer import summary_lines

    folder = RunFolder(tmp_path)
    folder.write_json("steer_summary", {
        "closer_fraction": 0.5, "closer_fraction_heldout": float("nan"), "label": "cell_type", "source": "A",
        "target": "B", "layer": 1, "n_features": 3, "epochs": 1, "n_source": 4, "n_heldout": 0,
        "gap_share_correct_up": float("nan"), "gap_n_up": 0, "gap_share_correct_down": 0.75, "gap_n_down": 4,
        "gap_binom_p_up": float("nan"), "gap_binom_p_down": 0.3125, "gap_median_gap": float("nan"), "n_changed": 0})
    text = "\n".join(summary_lines(folder, "mini"))
    assert "n/a of the 0 held out" in text and "n/a of 0 up genes and 75% of 4 down genes" in text
    assert "binomial p n/a / 0.31; median gap n/a" in text
