"""`sae-fast demo` end to end, shrunk for CI (fewer cells, one epoch): the summary has every required part.

The full demo is README command 1, not a test; this runs the same config and code path with --set
overrides."""

from __future__ import annotations

import re
from pathlib import Path

from sae_fast.cli import main
from sae_fast.commands.demo import demo_config_path
from sae_fast.run import load_config

SHRINK = ["--set", "data.max_cells=48", "--set", "sae.epochs=1", "--set", "interpret.baselines=['raw']"]


def test_demo_is_the_demo_config():
    cfg = load_config(demo_config_path())
    assert demo_config_path().read_bytes() == (Path(__file__).parents[1] / "examples" / "demo.toml").read_bytes()
    assert cfg.model.name == "mini" and cfg.model.path is None


def test_demo_summary_has_every_part(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "-q", *SHRINK]) == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert re.fullmatch(r"finished in \d+ s", lines[-1]), lines[-1]
    assert "not AIDO.Cell-100M" in text
    for metric in ("FVU", "L0", "dead"):
        assert re.search(rf"^\s+{metric}\s+[\d.]+", text, re.M), metric
    for basis in ("sae", "raw"):
        share = rf"^\s+{basis}: \d+/\d+ features with >= 1 significant term \([\d.]+%\)"
        assert re.search(share, text, re.M), basis
    examples = re.findall(r"^\s+feature (\d+): PR [\d.]+, top genes (\S+)", text, re.M)
    assert len(examples) == 3, text
    assert (out / "summary.txt").read_text().strip() == text.strip()
