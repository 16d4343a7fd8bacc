"""`sae-fast debatch CONFIG.toml --out DIR` end to end on 96 bundled cells: the tidy table, the ranking, the UMAPs
and the summary in the run folder. scib-metrics runs with a cheap subset of its metrics here (the full set, and its
equality with scib-metrics called directly, is tests/test_scib.py; jax's first compile of the rest takes minutes)."""

import numpy as np
import pandas as pd
import torch


def test_debatch_command_writes_tidy_table_and_figures(tmp_path, capsys, monkeypatch):
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    from sae_fast import datasets
    from sae_fast.steer import scib

    def cheap(adata, keys, batch_key, label_key, pre_integrated=None, n_jobs=1):
        return Benchmarker(adata, batch_key, label_key, list(keys), pre_integrated_embedding_obsm_key=pre_integrated,
                           bio_conservation_metrics=BioConservation(False, False, False, True, False),
                           batch_correction_metrics=BatchCorrection(False, False, False, True, False),
                           progress_bar=False)

    monkeypatch.setattr(scib, "benchmarker", cheap)
    from sae_fast.cli import main
    from sae_fast.sae import TopKSAE
    from sae_fast.sae.checkpoint import save_sae

    a = datasets.kang2018()
    b = a.obs["batch"].astype(str).to_numpy()
    keep = np.concatenate([np.flatnonzero(b == v)[:48] for v in sorted(set(b))])
    a[keep].copy().write_h5ad(tmp_path / "cells.h5ad")
    torch.manual_seed(0)
    save_sae(TopKSAE(128, 64, k=8), tmp_path / "sae")
    cfg = tmp_path / "debatch.toml"
    cfg.write_text(f'[model]\nname = "mini"\n[data]\npath = "{tmp_path / "cells.h5ad"}"\n'
                   f'[extract]\nlayer = 1\nmode = "fused"\n[run]\nsae = "{tmp_path / "sae"}"\n'
                   '[interpret]\ngene_sets = "immune_markers"\nbaselines = []\nmarkers = ""\n'
                   '[debatch]\nn_features = [0, 2]\nclamp = [-2.0]\nseeds = [42]\numap_n = [2]\nn_hvg = 500\n'
                   'n_pcs = 10\n')
    out = tmp_path / "run"
    assert main(["debatch", str(cfg), "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "Batch removal (debatch)" in printed and "unintegrated" in printed

    t = pd.read_csv(out / "tables" / "debatch.csv")
    metrics = ["silhouette_label", "graph_connectivity", "bio", "batch", "total"]
    assert ["n", "c", "selector", "seed", "embedding"] == list(t.columns[:5])
    assert sorted(t.columns[5:]) == sorted(metrics)
    assert set(t.selector) == {"unsteered", "unintegrated", "ami", "random"}
    np.testing.assert_allclose(t.total, 0.6 * t.bio + 0.4 * t.batch)
    zero = t[t.n == 0]  # clamping no feature is the unsteered embedding
    assert set(zero.embedding) == {"unsteered"} and zero[metrics].nunique().max() == 1
    ranking = pd.read_csv(out / "tables" / "debatch_ranking.csv")
    ami2 = t[(t.selector == "ami") & (t.n == 2)].embedding.item()
    assert ami2 == "ami_n2_c-2" and len(ranking) == 64 and (np.diff(ranking.ami) <= 0).all()
    for name in ("unsteered", "unintegrated", "clamp_n2"):
        assert (out / "figures" / f"umap_{name}.png").stat().st_size > 1000
