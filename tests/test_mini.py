"""The embedded `mini` model: it loads from package data with its log; its pretraining recipe (stratified
seeded split, gene choice, warm restarts, resumable training that ends where an uninterrupted run ends) and its
held-out evaluation."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from sae_fast import datasets, load_model
from sae_fast.models import pretrain_mini as pm
from sae_fast.models.aido_cell import aido_cell_genes
from sae_fast.models.registry import mini_path


def test_mini_loads_with_its_recipe_and_heldout_scores():
    mini = load_model("mini")
    log = json.loads((mini_path() / "training_log.json").read_text())
    assert mini.name == "mini" and (mini.n_layers, mini.d_model, len(mini.genes)) == (6, 128, pm.N_GENES)
    assert mini.bert.position_embedding.weight.dtype == torch.float32
    assert set(mini.genes) <= set(aido_cell_genes())
    assert mini.prepare(datasets.pbmc3k()[:2]).alignment.missing_from_data == []  # every gene is measured
    assert "NOT AIDO.Cell-100M" in log["what"]
    assert log["n_train_cells"] + log["n_heldout_cells"] == 17_035 and len(log["heldout_cells"]) == 1_718
    settings = pm.PretrainSettings()
    assert log["settings"] == json.loads(json.dumps(dataclasses.asdict(settings)))  # the recipe's defaults
    assert log["history"][-1]["step"] == pm.total_steps(settings) - 1
    h = log["heldout"]
    assert h["labelled_model_mse"] < h["labelled_per_gene_mean_mse"]
    assert h["labelled_gap_closed"] == pytest.approx(
        (h["labelled_per_gene_mean_mse"] - h["labelled_model_mse"])
        / (h["labelled_per_gene_mean_mse"] - h["labelled_per_cell_type_mean_mse"]))


def test_warm_restarts_continue_the_first_cycle():
    one = pm.PretrainSettings(steps=300, warmup=10)
    two = dataclasses.replace(one, restarts=(200,), restart_lr=1e-3)
    f, g = pm._lr_lambda(one), pm._lr_lambda(two)
    assert [f(s) for s in range(300)] == [g(s) for s in range(300)]  # a checkpoint of `one` resumes under `two`
    assert f(299) < 1e-3 and g(300) == pytest.approx(0.5 / 10)
    assert g(309) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 9 / 200)))  # warm-up done, decay begun
    assert g(499) < 1e-4 and pm.total_steps(two) == 500


def test_split_is_stratified_and_seeded():
    labels = np.repeat(np.array(["a", "b", "c", "d"]), [200, 50, 7, 1])
    held = pm.split_cells(labels, 0.1, seed=3)
    assert {lab: int(held[labels == lab].sum()) for lab in "abcd"} == {"a": 20, "b": 5, "c": 1, "d": 0}
    assert np.array_equal(held, pm.split_cells(labels, 0.1, seed=3))
    assert not np.array_equal(held, pm.split_cells(labels, 0.1, seed=4))


def test_masked_value_scores_match_numpy():
    rng = np.random.default_rng(0)
    train, truth = rng.gamma(1.0, 1.0, (60, 7)), rng.gamma(1.0, 1.0, (20, 7))
    train_labels, labels = rng.choice(["x", "y", "z"], 60), rng.choice(["x", "y", "w"], 20)  # w: no training cell
    truth[labels == "x"] += 2.0
    train[train_labels == "x"] += 2.0
    masked = rng.random((20, 7)) < 0.4
    pred = truth + rng.normal(0, 0.5, truth.shape)
    got = pm.masked_value_scores(pred.astype(np.float32), truth, masked, train, train_labels, labels)
    # independent: loop over the masked entries one by one
    model = base = ref = 0.0
    for i, j in zip(*np.nonzero(masked)):
        same = train[train_labels == labels[i], j]
        model += (pred[i, j].astype(np.float32) - truth[i, j]) ** 2
        base += (train[:, j].mean() - truth[i, j]) ** 2
        ref += ((same.mean() if len(same) else train[:, j].mean()) - truth[i, j]) ** 2
    n = masked.sum()
    assert got.n_masked_values == n and got.n_cells == 20
    assert got.model_mse == pytest.approx(model / n, rel=1e-6)
    assert got.per_gene_mean_mse == pytest.approx(base / n, rel=1e-12)
    assert got.per_cell_type_mean_mse == pytest.approx(ref / n, rel=1e-12)
    assert got.per_cell_type_mean_mse < got.per_gene_mean_mse
    assert got.gap_closed == pytest.approx((base - model) / (base - ref), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_cells():
    adata = datasets.pbmc3k()[::15].copy()  # 180 cells
    adata.obs["stratum"] = adata.obs["cell_type_fine"].astype(str)
    return adata


def test_choose_genes(tiny_cells):
    genes = pm.choose_genes(tiny_cells, 300)
    order = {g: i for i, g in enumerate(aido_cell_genes())}
    assert len(set(genes)) == 300 and [order[g] for g in genes] == sorted(order[g] for g in genes)
    expressed = set(tiny_cells.var_names[np.asarray((tiny_cells.X > 0).mean(0)).ravel() >= 0.01])
    markers = pm.marker_genes() & expressed & set(order)
    assert 50 < len(markers) < 300 and markers <= set(genes)  # every expressed marker is in


def test_resume_gives_the_uninterrupted_state(tiny_cells, tmp_path):
    cfg = dataclasses.replace(pm.MINI_CONFIG, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=48)
    s = pm.PretrainSettings(steps=6, tokens_per_step=256, genes_per_step=(32, 64), warmup=2)
    kw = {"adata": tiny_cells, "n_genes": 64, "config": cfg, "checkpoint_every": 2, "eval_every": 0}
    full = pm.pretrain(tmp_path / "a", s, **kw)
    assert pm.pretrain(tmp_path / "b", s, stop_after=3, **kw) is None  # interrupted after the step-4 checkpoint
    assert json.loads((tmp_path / "b/checkpoint/log.json").read_text())["steps_done"] == 4
    resumed = pm.pretrain(tmp_path / "b", s, **kw)
    a, b = (load_model("aido_cell", path=tmp_path / x).state_dict() for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["heldout"] == full["heldout"] and resumed["history"] == [
        {**r, "elapsed_s": r2["elapsed_s"]} for r, r2 in zip(full["history"], resumed["history"], strict=True)]
    with pytest.raises(ValueError, match="other settings"):
        pm.pretrain(tmp_path / "b", dataclasses.replace(s, lr=1e-4), **kw)
