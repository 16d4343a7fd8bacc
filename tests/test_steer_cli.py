"""`sae-fast steer`: tables and summary from a config + a trained SAE on the embedded mini model; bad input is one
line naming the culprit, with nothing written; the [steer] stage's section is documented and validated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_fast import TopKSAE, datasets, utils
from sae_fast.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steer_cli")
    adata = datasets.pbmc3k()
    ct = adata.obs["cell_type"].astype(str).to_numpy()
    rows = np.r_[np.flatnonzero(ct == "CD4 T")[:4], np.flatnonzero(ct == "CD8 T")[:4]]
    adata[rows].copy().write_h5ad(tmp / "cells.h5ad")
    torch.manual_seed(0)
    TopKSAE(128, 256, k=16).save(tmp / "sae")
    (tmp / "steer.toml").write_text(f"""
[model]
name = "mini"
[data]
path = "{tmp / 'cells.h5ad'}"
[extract]
layer = 2
[run]
sae = "{tmp / 'sae'}"
[steer]
epochs = 1
control = false
heldout = 0.25
""")
    return tmp


def _cli(args, capsys):
    verbosity = utils.VERBOSITY
    try:
        code = main(["steer", *args])
    finally:
        utils.VERBOSITY = verbosity
    out = capsys.readouterr()
    return code, out.out, out.err


def test_steer_command_writes_tables_and_summary(setup, capsys):
    out = setup / "out"
    code, printed, _ = _cli([str(setup / "steer.toml"), "-q", "--out", str(out), "--feature", "3", "--alpha=-5,5",
                             "--source", "CD4 T", "--target", "CD8 T", "--label", "cell_type"], capsys)
    assert code == 0
    for name in ("alpha_sweep", "alpha_sweep_flipped", "deg_f3_a-5", "deg_f3_a5", "contrast_alphas",
                 "contrast_cells", "contrast_gap", "contrast_history"):
        assert utils.read_table(out / "tables" / name) is not None, name
    sweep = utils.read_table(out / "tables" / "alpha_sweep")
    assert list(sweep.alpha) == [-5.0, 5.0] and {"n_up", "n_down", "top_up_terms", "top_down_terms"} <= set(sweep)
    cells = utils.read_table(out / "tables" / "contrast_cells")
    assert list(cells.columns[:3]) == ["cell", "dist_pre", "dist_post"] and cells.heldout.sum() == 1
    assert "closer to the target" in printed and "embedded mini model's" in printed
    assert "alpha -5: " in printed and "[Y]: 81%" in printed


@pytest.mark.parametrize("flags,culprit", [
    (["--feature", "5000"], "feature 5000"), (["--source", "NOPE", "--target", "CD8 T"], "'NOPE'"),
    (["--source", "CD4 T", "--target", "CD8 T", "--label", "nolabel"], "'nolabel'"),
    (["--feature", "3", "--alpha", "1,inf"], "inf"), (["--alpha", "1,x"], "--alpha")])
def test_bad_input_one_line_nothing_written(setup, capsys, flags, culprit):
    out = setup / "bad"
    code, _, err = _cli([str(setup / "steer.toml"), "--out", str(out), *flags], capsys)
    assert code == 2 and culprit in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_steer_stage_in_a_run(tmp_path):
    """A [steer] section runs after interpretation with the run's SAE and annotation; its block is in the summary."""
    from sae_fast.run import load_config, run_pipeline

    cfg = tmp_path / "run.toml"
    cfg.write_text("""
[model]
name = "mini"
batch_size = 4
[data]
path = "pbmc3k"
max_cells = 24
[extract]
layer = 1
mode = "fused"
[sae]
expansion = 2
k = 8
epochs = 1
batch_size = 1024
[interpret]
baselines = []
markers = ""
[steer]
alphas = [-5.0, 5.0]
sweep_cells = 8
source = "CD4 T"
target = "CD8 T"
epochs = 1
control = false
""")
    verbosity, utils.VERBOSITY = utils.VERBOSITY, 0
    try:
        res = run_pipeline(load_config(cfg), tmp_path / "out")
    finally:
        utils.VERBOSITY = verbosity
    tables = tmp_path / "out" / "tables"
    enr = utils.read_table(tables / "enrichment")
    alphas = utils.read_table(tables / "contrast_alphas")
    assert set(alphas.feature) == set(enr.loc[enr.basis == "sae", "feature"])  # the annotated features
    sweep = utils.read_table(tables / "alpha_sweep")
    best = int(enr[enr.basis == "sae"].sort_values("q_value", kind="stable").iloc[0].feature)
    assert set(sweep.feature) == {best}
    assert "Steering (the embedded mini model's numbers" in res.summary and "closer to the target" in res.summary
