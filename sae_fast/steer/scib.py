"""scIB integration scores through scib-metrics, set up as [P]'s code does (sae4scfm core/steering.py).

    table = scib_scores(adata, {"unsteered": E0, "clamp_n20": E1}, batch_key="stim", label_key="cell_type")
    table.loc["clamp_n20", ["bio", "batch", "total"]]

scib-metrics' `Benchmarker` with `BioConservation(nmi_ari_cluster_labels_leiden=True,
nmi_ari_cluster_labels_kmeans=False)` (Leiden NMI/ARI, not k-means), the default `BatchCorrection`, and
`get_results(min_max_scale=False)`; total = 0.6 bio + 0.4 batch (scib-metrics' own weighting). Every metric is
scib-metrics' code: this module only prepares the inputs and renames the columns.

The kNN graph (90 neighbours, self included; scib-metrics subsets it to 15 and 50) is computed once per
embedding by `knn`: scikit-learn's exact search up to `EXACT_MAX_CELLS` cells, pynndescent (scib-metrics'
default, approximate) above. `sae-fast bench scib` measured exact 5.6x / 4.9x / 3.5x faster at 10,000 / 20,000 /
40,000 cells (the O(n^2) distances catch up with n; 50,000 extrapolates that trend, unmeasured).

PCR comparison needs a pre-integration embedding: `pre_integrated` names it (the unintegrated PCA of
`unintegrated_embedding` in the batch-removal sweep); without it scib-metrics runs its own PCA of `adata.X`.

scib-metrics (with jax) is the optional extra `sae-fast[scib]`; without it these functions raise a one-line
error saying how to install it.
"""

from __future__ import annotations

import contextlib
import gc

import numpy as np
import pandas as pd

from sae_fast.errors import UserError

EXACT_MAX_CELLS = 50_000  # exact kNN (scikit-learn) up to here, pynndescent above (see bench/scib.py)
N_NEIGHBORS = 90  # the largest neighbourhood scib-metrics' Benchmarker uses (15, 50, 90)
BIO = "bio"
BATCH = "batch"
TOTAL = "total"
# scib-metrics' clean names -> our column names
COLUMNS = {"Isolated labels": "isolated_labels", "Leiden NMI": "leiden_nmi", "Leiden ARI": "leiden_ari",
           "Silhouette label": "silhouette_label", "cLISI": "clisi", "BRAS": "bras",
           "Silhouette batch": "silhouette_batch", "iLISI": "ilisi", "KBET": "kbet",
           "Graph connectivity": "graph_connectivity", "PCR comparison": "pcr_comparison",
           "Bio conservation": BIO, "Batch correction": BATCH, "Total": TOTAL}


def require_scib():
    """Import scib-metrics, or raise the one-line error naming the extra."""
    try:
        import scib_metrics  # noqa: F401
        from scib_metrics.benchmark import Benchmarker  # noqa: F401
    except ImportError as e:
        raise UserError(f"scIB scoring needs scib-metrics (and jax), which is not installed ({e}); install the "
                        "extra: pip install 'sae-fast[scib]'") from None
    import scib_metrics

    return scib_metrics


def knn(X, n_neighbors: int = N_NEIGHBORS, *, exact_max: int = EXACT_MAX_CELLS, n_jobs: int = 1):
    """scib-metrics NeighborsResults of `X` [n, d] (self included as the first neighbour): exact Euclidean
    kNN by scikit-learn up to `exact_max` cells, pynndescent above."""
    require_scib()
    from scib_metrics.nearest_neighbors import NeighborsResults, pynndescent

    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.shape[0] <= n_neighbors:
        raise UserError(f"scIB scoring needs more than {n_neighbors} cells (the 90-neighbour graph); got "
                        f"{X.shape[0]}")
    if X.shape[0] > exact_max:
        return pynndescent(X, n_neighbors=n_neighbors, random_state=0, n_jobs=n_jobs)
    from sklearn.neighbors import NearestNeighbors

    dist, ind = NearestNeighbors(n_neighbors=n_neighbors, n_jobs=n_jobs).fit(X).kneighbors(X)
    return NeighborsResults(indices=ind, distances=dist.astype(np.float32))


def benchmarker(adata, embedding_keys, batch_key: str, label_key: str, pre_integrated: str | None = None,
                n_jobs: int = 1):
    """scib-metrics' Benchmarker with [P]'s metric choice (Leiden NMI/ARI, default BatchCorrection)."""
    require_scib()
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    return Benchmarker(adata, batch_key=batch_key, label_key=label_key, embedding_obsm_keys=list(embedding_keys),
                       bio_conservation_metrics=BioConservation(nmi_ari_cluster_labels_leiden=True,
                                                                nmi_ari_cluster_labels_kmeans=False),
                       batch_correction_metrics=BatchCorrection(), pre_integrated_embedding_obsm_key=pre_integrated,
                       n_jobs=n_jobs, progress_bar=False)


def tidy_results(results: pd.DataFrame) -> pd.DataFrame:
    """Benchmarker.get_results() -> one row per embedding, float columns named as in COLUMNS."""
    df = results.drop(index="Metric Type", errors="ignore").astype(np.float64)
    df = df.rename(columns=COLUMNS)
    df.index.name = "embedding"
    return df


def scib_scores(adata, embeddings, batch_key: str, label_key: str, *, pre_integrated: str | None = None,
                exact_max: int = EXACT_MAX_CELLS, n_jobs: int = 1) -> pd.DataFrame:
    """scIB metrics of every embedding, one row each (index: the embedding's name).

    embeddings: {name: [n_cells, d] array} or a list of `adata.obsm` keys. pre_integrated: an obsm key (or a
    name in `embeddings`) used as the pre-integration embedding of PCR comparison. Columns: each metric
    (isolated_labels, leiden_nmi, leiden_ari, silhouette_label, clisi, bras, ilisi, kbet, graph_connectivity,
    pcr_comparison), then bio, batch and total = 0.6 bio + 0.4 batch."""
    require_scib()
    import anndata as ad

    for key in (batch_key, label_key):
        if key not in adata.obs:
            raise UserError(f"obs has no column {key!r} for scIB scoring; columns: {', '.join(adata.obs.columns)}")
    if isinstance(embeddings, dict):
        embs = {str(k): np.asarray(v) for k, v in embeddings.items()}
    else:
        missing = [k for k in embeddings if k not in adata.obsm]
        if missing:
            raise UserError(f"obsm has no embedding {missing[0]!r}; obsm keys: {', '.join(adata.obsm)}")
        embs = {str(k): np.asarray(adata.obsm[k]) for k in embeddings}
    if not embs:
        raise UserError("scib_scores: no embedding to score")
    for name, E in embs.items():
        if E.ndim != 2 or E.shape[0] != adata.n_obs:
            raise UserError(f"embedding {name!r} has shape {E.shape}; expected [{adata.n_obs} cells, d]")
        if not np.isfinite(E).all():
            raise UserError(f"embedding {name!r} holds non-finite values")
    obs = pd.DataFrame({batch_key: adata.obs[batch_key].astype(str).to_numpy(),
                        label_key: adata.obs[label_key].astype(str).to_numpy()}, index=adata.obs_names)
    obs = obs.loc[:, ~obs.columns.duplicated()]
    if pre_integrated is None and adata.X is None:
        raise UserError("scib_scores: give pre_integrated (an embedding for PCR comparison) or an adata.X to "
                        "take its PCA from")
    bd = ad.AnnData(X=adata.X if pre_integrated is None else None, obs=obs)
    for name, E in embs.items():
        bd.obsm[name] = np.ascontiguousarray(E, dtype=np.float32)
    if pre_integrated is not None and pre_integrated not in bd.obsm:
        if pre_integrated not in adata.obsm:
            raise UserError(f"pre_integrated {pre_integrated!r} is neither an embedding given nor an obsm key")
        bd.obsm[pre_integrated] = np.asarray(adata.obsm[pre_integrated], np.float32)
    bm = benchmarker(bd, list(embs), batch_key, label_key, pre_integrated, n_jobs=n_jobs)
    with _gc_frozen():
        bm.prepare(neighbor_computer=lambda E, k: knn(E, k, exact_max=exact_max, n_jobs=n_jobs))
        bm.benchmark()
    return tidy_results(bm.get_results(min_max_scale=False)).loc[list(embs)]


@contextlib.contextmanager
def _gc_frozen():
    """Move every object alive now out of the garbage collector's reach for the block, then back.

    The Benchmarker runs a full `gc.collect()` before each metric (22 times for 2 embeddings). In a process that
    has imported scib-metrics (jax, scanpy, numba, igraph) and torch, each one walks ~500,000 long-lived objects:
    0.5-3.9 s per collection measured on this project's 2-core machine, most of a 1,000-cell scoring. Frozen, those
    objects are skipped; what the scoring itself allocates is still collected. A caller's own freeze is left
    alone."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
