"""The embedded `mini` model loads from package data, beats the per-gene-mean baseline on held-out cells."""

from __future__ import annotations

import json

import pytest
import torch

from sae_fast import datasets, load_model
from sae_fast.models.aido_cell import aido_cell_genes
from sae_fast.models.pretrain_mini import MINI_CONFIG, evaluate, masked_values
from sae_fast.models.registry import mini_path


@pytest.fixture(scope="module")
def mini():
    return load_model("mini")


@pytest.fixture(scope="module")
def log():
    return json.loads((mini_path() / "training_log.json").read_text())


def test_mini_loads(mini, log):
    assert mini.name == "mini" and (mini.n_layers, mini.d_model) == (4, 128) and mini.config == MINI_CONFIG
    assert mini.bert.position_embedding.weight.dtype == torch.float32
    demo = datasets.pbmc_demo()
    assert len(mini.genes) == 1024 and set(mini.genes) <= set(demo.var_names) & set(aido_cell_genes())
    assert mini.prepare(demo).alignment.missing_from_data == []
    assert "NOT AIDO.Cell-100M" in log["what"]
    assert log["heldout_masked_mse"] < log["heldout_baseline_per_gene_mean_mse"]


def test_mini_beats_per_gene_mean_on_heldout_cells(mini, log):
    """Recompute the shipped held-out numbers from the shipped weights and the bundled cells."""
    demo = datasets.pbmc_demo()
    held = demo.obs_names.isin(log["heldout_cells"])
    assert held.sum() == log["n_heldout_cells"]
    gene_mean = masked_values(mini, demo[~held], 0.0, 0)[1].mean(0, keepdim=True)
    fraction = float(log["settings"]["mask_fraction"])
    values, truth = masked_values(mini, demo[held], fraction, log["eval_mask_seed"])
    res = evaluate(mini, values, truth, gene_mean)
    assert res["n_masked_values"] == log["heldout_n_masked_values"]
    assert res["model_mse"] == pytest.approx(log["heldout_masked_mse"], rel=1e-4)
    assert res["baseline_mse"] == pytest.approx(log["heldout_baseline_per_gene_mean_mse"], rel=1e-4)
    assert res["model_mse"] < res["baseline_mse"]
