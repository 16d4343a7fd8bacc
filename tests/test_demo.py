"""`sae-fast demo` end to end, shrunk for CI (fewer cells, one epoch): every number of the summary is checked
against the run folder's tables and against a recomputation from the saved SAE on the held-out cells.

The full demo is README command 1, not a test; this runs the same config and code path with --set
overrides."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sae_fast.cli import main
from sae_fast.commands.demo import demo_config_path
from sae_fast.run import load_config
from sae_fast.run.config import model_for

SHRINK = ["--set", "data.max_cells=48", "--set", "sae.epochs=1", "--set", "interpret.baselines=['raw']"]


def test_demo_is_the_demo_config():
    cfg = load_config(demo_config_path())
    assert demo_config_path().read_bytes() == (Path(__file__).parents[1] / "examples" / "demo.toml").read_bytes()
    assert cfg.model.name == "mini" and cfg.model.path is None


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["demo", "--out", str(out), "-q", *SHRINK]) == 0
    return out, buf.getvalue()


def table(out: Path, name: str) -> pd.DataFrame:
    path = next((out / "tables").glob(f"{name}.*"))
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def number(text: str, label: str) -> float:
    m = re.search(rf"^\s+{label}\s+([\d.,]+)", text, re.M)
    assert m, f"no {label} line in:\n{text}"
    return float(m.group(1).replace(",", ""))


def test_summary_format(demo):
    out, text = demo
    lines = text.strip().splitlines()
    assert re.fullmatch(r"finished in \d+ s", lines[-1]), lines[-1]
    assert "not AIDO.Cell-100M" in text
    assert re.search(r"^SAE, measured on 5 held-out cells \(10%, not trained on\)$", text, re.M), text
    assert (out / "summary.txt").read_text().strip() == text.strip()


def test_sae_numbers_are_the_held_out_evaluation(demo):
    """FVU, L0, dead % and the token count in the summary equal tables/sae_metrics.json and a float64
    recomputation from the saved SAE on shards/heldout, which holds exactly the held-out cells' activations."""
    import sae_fast
    from sae_fast import datasets

    out, text = demo
    cfg = load_config(out / "config.resolved.toml")
    cells = table(out, "cells")
    held = np.flatnonzero(cells["set"].to_numpy() == "heldout")
    assert len(held) == 5 and (cells["set"] == "train").sum() == 43
    # the held-out shards are those cells' activations, and training never saw them
    adata = datasets.read(cfg.data.path)[: cfg.data.max_cells].copy()
    model = model_for(cfg, adata)  # mini on the demo's gene context ([model] context), as the run
    assert list(cells["cell"]) == list(adata.obs_names)
    ours = sae_fast.open_shards(out / "shards" / "heldout")
    again = sae_fast.extract(model, adata[held].copy(), cfg.extract.layer, out.parent / "again",
                             dtype=cfg.extract.dtype)
    x = ours.read(0, len(ours)).float()
    assert len(ours) == len(again) == 5 * len(model.genes)
    assert torch.equal(x, again.read(0, len(again)).float())
    assert len(sae_fast.open_shards(out / "shards" / "train")) == 43 * len(model.genes)
    # recompute the metrics from the saved SAE
    sae = sae_fast.load_sae(out / "sae").eval()
    with torch.no_grad():
        x_hat, code = sae(x)
    xd, hd = x.double().numpy(), x_hat.double().numpy()
    fvu = ((xd - hd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    nz = code.values != 0
    l0 = float(nz.sum()) / len(x)
    dead = 1 - len(torch.unique(code.indices[nz])) / sae.W_dec.shape[0]
    m = json.loads((out / "tables" / "sae_metrics.json").read_text())
    assert m["fvu"] == pytest.approx(fvu, rel=1e-6) and m["l0"] == pytest.approx(l0) and \
        m["dead_fraction"] == pytest.approx(dead) and m["n_tokens"] == len(x)
    assert number(text, "FVU") == round(fvu, 4) and number(text, "L0") == round(l0, 2)
    assert number(text, "dead") == round(100 * dead, 1) and number(text, "tokens evaluated") == len(x)
    assert number(text, "features") == sae.W_dec.shape[0] == 8 * model.d_model


def test_enriched_shares_and_examples_are_the_tables(demo):
    """Each basis' 'a/b features with >= 1 significant term' counts the features of the enrichment table with
    q < alpha; the example features show their own top genes and best terms."""
    out, text = demo
    alpha = load_config(out / "config.resolved.toml").interpret.alpha
    enr, feats = table(out, "enrichment"), table(out, "features")
    sizes = {"sae": 8 * 128, "raw": 128}
    for basis in ("sae", "raw"):
        m = re.search(rf"^\s+{basis}: (\d+)/(\d+) features with >= 1 significant term \(([\d.]+)%\)", text, re.M)
        assert m, basis
        sig = enr[(enr["basis"] == basis) & (enr["q_value"] < alpha)]["feature"].nunique()
        assert (int(m.group(1)), int(m.group(2))) == (sig, sizes[basis])
        assert float(m.group(3)) == round(100 * sig / sizes[basis], 1)
    assert int(re.search(r"^\s+sae: (\d+)/", text, re.M).group(1)) == int((feats["n_sig"] > 0).sum())
    examples = re.findall(r"^\s+feature (\d+): PR ([\d.]+), top genes (.+)$", text, re.M)
    assert len(examples) == 3, text
    for f, pr, genes in examples:
        row = feats.set_index("feature").loc[int(f)]
        assert float(pr) == round(row["pr"], 1)
        assert genes.split(", ") == row["top_genes"].split(";")[: len(genes.split(", "))]
        first = re.search(r"(GO:\d+) .* \(q = ([\d.e+-]+)", text.split(f"feature {f}:")[1])
        rows = enr[(enr["basis"] == "sae") & (enr["feature"] == int(f))]
        assert first.group(1) in set(rows["term"]) and float(first.group(2)) == float(f"{rows['q_value'].min():.2g}")
