"""scIB scoring (sae_fast.steer.scib) against scib-metrics called directly on the same embedding and kNN."""

import gc
import sys

import numpy as np
import pandas as pd
import pytest

from sae_fast.errors import UserError


def _cells(n_per_batch=75):
    """Bundled Kang 2018 cells of both conditions (batch = stim; raw counts), 2 x n_per_batch cells."""
    from sae_fast import datasets

    a = datasets.kang2018()
    b = a.obs["batch"].astype(str).to_numpy()
    keep = np.concatenate([np.flatnonzero(b == v)[:n_per_batch] for v in sorted(set(b))])
    return a[keep].copy()


def _sklearn_knn(X, k):
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    dist, ind = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    return NeighborsResults(indices=ind, distances=dist)


def test_unintegrated_table_equals_scib_metrics_direct(monkeypatch):
    import anndata as ad
    import scipy.sparse.linalg
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    # kBET's diffusion map (scib_metrics.utils._diffusion_nn) calls ARPACK's eigsh without a start vector, so ARPACK
    # draws one from its process-wide generator: the same metric called twice in one process starts from different
    # vectors, and on near-degenerate spectra lands on different eigenvectors (KBET 0.776 vs 0.943 seen on an AVX2
    # CPU). Both sides get the same fixed start vector here.
    eigsh = scipy.sparse.linalg.eigsh

    def fixed_start(A, *args, **kw):
        kw.setdefault("v0", np.random.default_rng(0).uniform(0.5, 1.5, A.shape[0]))
        return eigsh(A, *args, **kw)

    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", fixed_start)

    from sae_fast.steer.debatch import unintegrated_embedding
    from sae_fast.steer.scib import scib_scores

    a = _cells()
    E = unintegrated_embedding(a, "batch", n_hvg=500, n_pcs=10)
    assert E.shape == (a.n_obs, 10)
    rng = np.random.default_rng(0)
    other = E + rng.normal(scale=0.5, size=E.shape).astype(np.float32)
    ours = scib_scores(a, {"unintegrated": E, "other": other}, "batch", "cell_type", pre_integrated="unintegrated")
    assert gc.get_freeze_count() == 0  # the collector's objects are handed back after the scoring

    # scib-metrics directly, as [P]'s code sets it up, with scikit-learn's exact kNN
    direct = ad.AnnData(obs=pd.DataFrame({"batch": a.obs["batch"].astype(str).to_numpy(),
                                          "cell_type": a.obs["cell_type"].astype(str).to_numpy()}))
    direct.obsm["unintegrated"], direct.obsm["other"] = E, other
    bm = Benchmarker(direct, batch_key="batch", label_key="cell_type", embedding_obsm_keys=["unintegrated", "other"],
                     bio_conservation_metrics=BioConservation(nmi_ari_cluster_labels_leiden=True,
                                                              nmi_ari_cluster_labels_kmeans=False),
                     batch_correction_metrics=BatchCorrection(), pre_integrated_embedding_obsm_key="unintegrated",
                     progress_bar=False)
    bm.prepare(neighbor_computer=_sklearn_knn)
    bm.benchmark()
    ref = bm.get_results(min_max_scale=False).drop(index="Metric Type").astype(float)

    names = {"Isolated labels": "isolated_labels", "Leiden NMI": "leiden_nmi", "Leiden ARI": "leiden_ari",
             "Silhouette label": "silhouette_label", "cLISI": "clisi", "BRAS": "bras", "iLISI": "ilisi",
             "KBET": "kbet", "Graph connectivity": "graph_connectivity", "PCR comparison": "pcr_comparison",
             "Bio conservation": "bio", "Batch correction": "batch", "Total": "total"}
    assert set(ref.columns) == set(names)
    for emb in ("unintegrated", "other"):
        for col, ours_col in names.items():
            assert ours.loc[emb, ours_col] == pytest.approx(ref.loc[emb, col], rel=1e-9, abs=1e-12), (emb, col)
        assert ours.loc[emb, "total"] == pytest.approx(0.6 * ours.loc[emb, "bio"] + 0.4 * ours.loc[emb, "batch"])


def test_knn_exact_and_pynndescent_include_self():
    from sae_fast.steer.scib import knn

    X = np.random.default_rng(1).normal(size=(200, 6)).astype(np.float32)
    exact = knn(X, 10)
    d = ((X[:, None] - X[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.sort(exact.indices, 1), np.sort(np.argsort(d, 1, kind="stable")[:, :10], 1))
    assert (exact.indices[:, 0] == np.arange(200)).all()
    approx = knn(X, 10, exact_max=100)  # above exact_max: pynndescent (scib-metrics' default)
    assert approx.indices.shape == (200, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.indices, exact.indices)]) > 0.9


def test_missing_extra_names_it(monkeypatch):
    from sae_fast.steer import scib

    monkeypatch.setitem(sys.modules, "scib_metrics", None)
    with pytest.raises(UserError, match=r"pip install 'sae-fast\[scib\]'"):
        scib.require_scib()


def test_bad_input_one_line_errors():
    import anndata as ad

    from sae_fast.steer.scib import scib_scores

    a = ad.AnnData(obs=pd.DataFrame({"b": ["x", "y"] * 50, "c": ["p"] * 100}))
    E = np.zeros((100, 3), np.float32)
    with pytest.raises(UserError, match="no column 'batch'"):
        scib_scores(a, {"e": E}, "batch", "c", pre_integrated="e")
    with pytest.raises(UserError, match="shape"):
        scib_scores(a, {"e": E[:5]}, "b", "c", pre_integrated="e")
    with pytest.raises(UserError, match="non-finite"):
        scib_scores(a, {"e": np.full((100, 3), np.nan)}, "b", "c", pre_integrated="e")


def test_gc_frozen_during_scoring_only_and_a_callers_freeze_kept():
    from sae_fast.steer.scib import _gc_frozen

    assert gc.get_freeze_count() == 0
    with _gc_frozen():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        kept = gc.get_freeze_count()
        with _gc_frozen():
            pass
        assert gc.get_freeze_count() == kept
    finally:
        gc.unfreeze()
