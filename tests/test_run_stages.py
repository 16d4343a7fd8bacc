"""The stage plug-in contract of sae_fast.run: a stage with its own optional section runs only when the config
has that section, gets the context the docstring promises, records tables and a summary block, and is skipped
on resume with its result read back from state.json."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import pytest

from sae_fast.config import option
from sae_fast.errors import UserError
from sae_fast.run import config as run_config
from sae_fast.run import load_config, run_pipeline, stages
from sae_fast.run.context import Context, Stage


@dataclass
class ProbeSection:
    """[probe]: a test stage."""

    scale: float = option(2.0, "a number the stage multiplies the cell count by")


def _check(ctx: Context) -> None:
    if ctx.config.probe.scale < 0:
        raise UserError(f"probe.scale = {ctx.config.probe.scale}: must be >= 0")


def _run(ctx: Context) -> dict:
    n = ctx.adata.n_obs
    assert ctx.model.name == "mini" and ctx.config.extract.layer == 1
    assert ctx.results["before"]["cells"] == n and ctx.results["before"]["seconds"] >= 0
    ctx.folder.write_table("probe_cells", pd.DataFrame({"cell": ctx.adata.obs_names, "x": ctx.config.probe.scale}))
    return {"scaled": n * ctx.config.probe.scale}


def _summary(ctx: Context) -> list[str]:
    return ["PROBE", f"  rows {len(ctx.folder.read_table('probe_cells'))}"]


@pytest.fixture
def probe_stages(monkeypatch):
    """STAGES = [before, probe (plug-in), summary]: no extraction or training, so the run takes seconds."""
    before = Stage("before", lambda ctx: {"cells": ctx.adata.n_obs})
    probe = Stage("probe", _run, section=ProbeSection, check=_check, summary=_summary)
    summary = next(s for s in stages.STAGES if s.name == "summary")
    monkeypatch.setattr(stages, "STAGES", [before, probe, summary])
    run_config.sections.cache_clear()
    yield
    run_config.sections.cache_clear()


BASE = ["model.name=mini", "data.path=pbmc3k", "data.max_cells=6", "extract.layer=1"]


def test_optional_section_runs_its_stage(probe_stages, tmp_path):
    assert load_config(None, BASE).probe is None  # absent section: None, stage skipped
    out = tmp_path / "without"
    result = run_pipeline(load_config(None, BASE), out)
    assert "probe" not in json.loads((out / "state.json").read_text())["done"]
    assert "PROBE" not in result.summary

    cfg = load_config(None, [*BASE, "probe.scale=3.0"])
    assert cfg.probe.scale == 3.0 and "probe" in cfg.to_dict()
    out = tmp_path / "with"
    first = run_pipeline(cfg, out)
    done = json.loads((out / "state.json").read_text())["done"]
    assert done["probe"]["scaled"] == 18.0
    assert "PROBE\n  rows 6" in first.summary and (out / "summary.txt").read_text().startswith(first.summary)
    assert '[probe]\nscale = 3.0' in (out / "config.resolved.toml").read_text()
    second = run_pipeline(cfg, out)  # resume: probe skipped, its summary block still there (read from files)
    assert second.skipped == ["before", "probe"] and "PROBE\n  rows 6" in second.summary


def test_plugin_check_runs_before_the_folder_exists(probe_stages, tmp_path):
    with pytest.raises(UserError, match="probe.scale = -1.0"):
        run_pipeline(load_config(None, [*BASE, "probe.scale=-1.0"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match=r"unknown option\(s\) probe.scal; valid: scale"):
        load_config(None, [*BASE, "probe.scal=1"])


def test_every_plugin_stage_has_a_documented_section():
    """Every stage with a section has it registered, and its section documents each key."""
    for stage in stages.STAGES:
        if stage.section is not None:
            assert run_config.sections()[stage.name] is stage.section
            assert all(f.metadata.get("help") for f in stage.section.__dataclass_fields__.values())
