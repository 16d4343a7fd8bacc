"""Feature overlap graph (SPEC §2): which features share top genes, and which GO terms such groups share.

For top-gene sets A_i, A_j the overlap coefficient is |A_i ∩ A_j| / sqrt(|A_i| |A_j|) (1 for identical sets).
Features are joined by an edge where it exceeds 0.2; connected components (scipy.sparse.csgraph) of two or
more features are reported with the significant terms that at least two of their features share.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components


class OverlapGraph(NamedTuple):
    coefficients: sp.csr_matrix  # [F, F] overlap coefficient (upper and lower triangle, zero diagonal)
    component: np.ndarray  # [F] component label of each feature
    components: pd.DataFrame  # components of >= 2 features: component, n_features, features, shared_terms


def overlap_coefficients(top: list[list[str]]) -> sp.csr_matrix:
    """Sparse [F, F] matrix of |A_i ∩ A_j| / sqrt(|A_i| |A_j|) between the features' top-gene sets
    (diagonal 0)."""
    vocab = {g: j for j, g in enumerate(dict.fromkeys(g for t in top for g in t))}
    rows = np.repeat(np.arange(len(top)), [len(set(t)) for t in top])
    cols = np.fromiter((vocab[g] for t in top for g in dict.fromkeys(t)), np.int64, count=rows.size)
    B = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(len(top), max(len(vocab), 1)))
    inter = (B @ B.T).tocoo()
    size = np.asarray(B.sum(1)).ravel()
    keep = inter.row != inter.col
    r, c, v = inter.row[keep], inter.col[keep], inter.data[keep]
    return sp.csr_matrix((v / np.sqrt(size[r] * size[c]), (r, c)), shape=(len(top), len(top)))


def overlap_graph(top: list[list[str]], enrichment: pd.DataFrame | None = None, threshold: float = 0.2,
                  n_terms: int = 5) -> OverlapGraph:
    """Edges where the overlap coefficient > threshold; components with the terms >= 2 of their features
    share.

    enrichment: significant ORA rows with columns feature, term, name (as from `annotate_matrix`)."""
    coef = overlap_coefficients(top)
    adj = coef.copy()
    adj.data = (adj.data > threshold).astype(np.int8)
    adj.eliminate_zeros()
    _, label = connected_components(adj, directed=False)
    sizes = np.bincount(label)
    rows = []
    for comp in np.flatnonzero(sizes >= 2):
        feats = np.flatnonzero(label == comp)
        shared = ""
        if enrichment is not None and len(enrichment):
            sub = enrichment[enrichment["feature"].isin(feats)]
            counts = sub.groupby(["term", "name"], observed=True).size()
            counts = counts[counts >= 2].sort_values(ascending=False, kind="stable").head(n_terms)
            shared = "; ".join(f"{name} ({n})" for (_, name), n in counts.items())
        rows.append({"component": int(comp), "n_features": int(feats.size),
                     "features": ";".join(map(str, feats)), "shared_terms": shared})
    table = pd.DataFrame(rows, columns=["component", "n_features", "features", "shared_terms"])
    return OverlapGraph(coef, label, table.sort_values("n_features", ascending=False, kind="stable")
                        .reset_index(drop=True))
