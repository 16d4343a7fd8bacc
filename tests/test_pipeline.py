"""`sae-fast run`: config sections and defaults, the run folder, resume (also after SIGKILL), --force."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae_fast.cli import main
from sae_fast.errors import UserError
from sae_fast.run import load_config, run_pipeline, sections
from sae_fast.run.config import CORE

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))

# A tiny job on the embedded model: few cells, a small SAE, one epoch, raw-neuron baseline only.
TINY = """
[model]
name = "mini"
batch_size = 4

[data]
path = "pbmc3k"
max_cells = {cells}

[extract]
layer = 1
mode = "{mode}"

[sae]
expansion = 2
k = 8
epochs = {epochs}
batch_size = 1024
seed = 0

[interpret]
baselines = ["raw"]
markers = ""
"""


def tiny(tmp_path, cells=12, epochs=1, mode="shards", name="tiny.toml"):
    path = tmp_path / name
    path.write_text(TINY.format(cells=cells, epochs=epochs, mode=mode))
    return path


def log_events(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_defaults_follow_yanovsky():
    cfg = load_config(None)
    assert (cfg.model.name, cfg.model.batch_size) == ("aido_cell_100m", 8)
    assert (cfg.extract.layer, cfg.extract.tokens) == (12, "all")
    sae = cfg.sae
    assert (sae.arch, sae.k, sae.expansion, sae.lr, sae.epochs) == ("topk", 32, 8, 1e-3, 10)
    assert (cfg.interpret.gene_sets, cfg.interpret.gene_filter, cfg.interpret.top_rule) == ("go_bp", "paper",
                                                                                            "paper")
    assert cfg.interpret.alpha == 0.05 and "raw" in cfg.interpret.baselines


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_parse(path):
    cfg = load_config(path)
    assert cfg.model.name in {"mini", "aido_cell_100m", "scgpt"}
    if path.name == "demo.toml":
        assert cfg.model.name == "mini" and cfg.model.path is None
    if path.name.startswith("scgpt"):
        assert (cfg.extract.layer, cfg.sae.arch, cfg.sae.k) == (10, "batchtopk", 10)
    if path.name.startswith("aido_cell_100m"):
        assert (cfg.extract.layer, cfg.sae.k, cfg.sae.expansion, cfg.sae.epochs) == (12, 32, 8, 10)


def test_examples_cover_demo_y_and_p():
    assert {p.name for p in EXAMPLES} >= {"demo.toml", "aido_cell_100m_pbmc3k.toml", "scgpt_layer10.toml"}


def test_unknown_keys_and_sections_list_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sae]\nepoch = 3\n")
    with pytest.raises(UserError, match=r"bad.toml: unknown option\(s\) sae.epoch; valid: .*epochs"):
        load_config(bad)
    bad.write_text("[trainer]\nepochs = 3\n")
    with pytest.raises(UserError, match=r"unknown section\(s\) \[trainer\]; valid: .*\[sae\]"):
        load_config(bad)
    with pytest.raises(UserError, match="SECTION.KEY=VALUE"):
        load_config(None, ["epochs=3"])
    with pytest.raises(UserError, match="choose one of"):
        load_config(None, ["extract.mode=disk"])


def test_overrides_parse_toml_values():
    cfg = load_config(None, ["sae.epochs=3", "sae.lr=2e-4", "interpret.baselines=['raw']", "model.name=mini",
                             "extract.keep_shards=false"])
    assert (cfg.sae.epochs, cfg.sae.lr, cfg.interpret.baselines, cfg.model.name) == (3, 2e-4, ["raw"], "mini")
    assert cfg.extract.keep_shards is False


def test_docs_describe_every_key():
    """Core sections in docs/run.md; a plug-in stage's section there or in docs/<stage>.md."""
    run_doc = (ROOT / "docs" / "run.md").read_text()
    for name, cls in sections().items():
        if name == "sae":
            continue
        own = ROOT / "docs" / f"{name}.md"
        doc = run_doc + (own.read_text() if own.is_file() and name not in CORE else "")
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in doc, f"docs/run.md (or docs/{name}.md) does not describe [{name}] {f.name}"
    train_doc = (ROOT / "docs" / "train.md").read_text()
    for f in dataclasses.fields(sections()["sae"]):
        flag = "--" + f.name.replace("_", "-")
        assert f"`{flag}`" in train_doc, f"docs/train.md does not describe TrainConfig.{f.name}"


def test_run_folder_resume_and_force(tmp_path, capsys):
    cfg_path = tiny(tmp_path)
    out = tmp_path / "run"
    first = run_pipeline(load_config(cfg_path), out)
    assert not first.resumed and first.skipped == []
    for name in ["config.resolved.toml", "environment.json", "log.jsonl", "state.json", "summary.txt",
                 "annotated.h5ad", "sae", "shards", "tables", "report.html"]:
        assert (out / name).exists(), name
    assert first.summary.splitlines()[-1] == f"finished in {first.seconds:.0f} s" or \
        first.summary.splitlines()[-1].startswith("finished in ")
    # the resolved config is a complete, loadable config equal to what ran
    assert load_config(out / "config.resolved.toml").to_dict() == load_config(cfg_path).to_dict()
    env = json.loads((out / "environment.json").read_text())
    assert env["packages"]["torch"] and env["cores"]
    done = [e for e in log_events(out) if e["event"] == "stage_done"]
    assert [e["stage"] for e in done] == ["extract", "train", "evaluate", "interpret", "summary", "report"]
    assert all(e["seconds"] >= 0 for e in done)
    # the same config again: every stage but the summary is skipped
    mtime = (out / "annotated.h5ad").stat().st_mtime_ns
    second = run_pipeline(load_config(cfg_path), out)
    assert second.resumed and second.skipped == ["extract", "train", "evaluate", "interpret", "report"]
    assert (out / "annotated.h5ad").stat().st_mtime_ns == mtime
    assert [e["event"] for e in log_events(out)].count("resume") == 1
    # a different config is refused, naming the key; --force starts fresh
    capsys.readouterr()
    assert main(["run", str(cfg_path), "--out", str(out), "--set", "sae.k=4", "-q"]) == 2
    assert "sae.k: 8 -> 4" in capsys.readouterr().err
    assert main(["run", str(cfg_path), "--out", str(out), "--set", "sae.k=4", "--force", "-q"]) == 0
    assert "finished in" in capsys.readouterr().out
    assert [e["event"] for e in log_events(out)].count("resume") == 0


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    assert main(["run", str(tiny(tmp_path)), "--out", str(precious), "--force", "-q"]) == 2
    assert "not a sae-fast run folder" in capsys.readouterr().err
    assert (precious / "thesis.tex").exists()


def test_killed_run_resumes_and_completes(tmp_path):
    """SIGKILL `sae-fast run` once training has checkpointed; the second run skips extraction, resumes
    training from the checkpoint and completes."""
    cfg_path = tiny(tmp_path, cells=16, epochs=8)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sae_fast", "run", str(cfg_path), "--out", str(out), "-q",
           "--set", "sae.checkpoint_every=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            state = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {}
            if "extract" in state.get("done", {}) and any((out / "sae").glob("*state*")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "summary.txt").exists()
    assert "train" not in json.loads((out / "state.json").read_text())["done"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("finished in ")
    events = log_events(out)
    assert [e["event"] for e in events].count("resume") == 1
    stages = [e["stage"] for e in events if e["event"] == "stage_done"]
    assert stages.count("extract") == 1 and stages.count("train") == 1 and stages[-2:] == ["summary", "report"]


def test_resume_survives_a_torn_metrics_line(tmp_path):
    """A kill in the middle of appending to metrics.jsonl leaves a partial last line; the resume drops it (and
    the lines after the checkpoint) instead of crashing on it."""
    from sae_fast.sae.train import _trim_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 50, "fvu": 0.5}\n{"step": 100, "fvu": 0.4}\n{"step": 150, "fvu": 0.3}\n{"step": 2')
    _trim_log(log, 100)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [50, 100]


def test_fixed_threads_make_the_run_independent_of_the_ambient_setting(tmp_path, monkeypatch):
    """[run] threads fixes the CPU threads of every stage (reductions split over threads round differently),
    so two runs of one config agree bitwise whatever the process was set to, and the setting comes back.
    (Extraction, training and evaluation only: interpretation reads the same numbers.)"""
    import torch
    from safetensors.numpy import load_file

    from sae_fast.run import stages

    monkeypatch.setattr(stages, "STAGES", [s for s in stages.STAGES if s.name != "interpret"])
    cfg_path = tiny(tmp_path, cells=12, epochs=2)
    before = torch.get_num_threads()
    weights, summaries = [], []
    try:
        for ambient in (1, 3):
            torch.set_num_threads(ambient)
            result = run_pipeline(load_config(cfg_path, ["run.threads=2"]), tmp_path / f"t{ambient}")
            assert torch.get_num_threads() == ambient
            weights.append(load_file(tmp_path / f"t{ambient}" / "sae" / "sae_weights.safetensors"))
            summaries.append([line for line in result.summary.splitlines()
                              if not line.startswith(("finished in", "run folder"))])
    finally:
        torch.set_num_threads(before)
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    assert summaries[0] == summaries[1]
