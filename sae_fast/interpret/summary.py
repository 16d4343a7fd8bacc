"""From a feature x gene matrix to per-feature GO annotations, and summaries that compare feature bases.

`annotate_matrix` is THE pipeline every basis goes through identically (SAE features, raw residual neurons,
ICA components): participation ratio -> top genes -> ORA against the background -> per-feature table with the
number of significant terms (q < alpha), the best term, and the max information content over its significant
terms.

`compare_bases` then reports the share of features with >= 1 significant term per basis and a two-sided
Mann-Whitney U test of max IC (SAE vs raw neurons, over the features that have a significant term), as [Y].
`ica_matrix` builds the ICA baseline (scikit-learn FastICA) without a second pass over the data: ICA is
linear, so the mean over cells of a component at a gene is the component applied to the raw neurons' mean
there.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from sae_fast.interpret.enrich import compile_library, ora
from sae_fast.interpret.features import n_top_genes, participation_ratio, top_genes
from sae_fast.interpret.genesets import load_gene_sets


class MatrixAnnotation(NamedTuple):
    # one row per feature: pr, n_top, top_genes, n_sig, best_term, best_name, best_q, max_ic
    features: pd.DataFrame
    enrichment: pd.DataFrame  # the significant ORA rows (q < alpha), query = feature index as str
    top: list[list[str]]  # each feature's tested top genes, largest activation first


def annotate_matrix(F, genes, gene_sets="go_bp", *, rule: str = "paper", s: float = 0.6,
                    clip: tuple[int, int] = (10, 100), alpha: float = 0.05, min_genes: int = 1,
                    library=None) -> MatrixAnnotation:
    """Annotate every row of F [n_features, n_genes] (columns = `genes` = the background) with GO terms.

    A feature with fewer than `min_genes` positive top genes is not tested (n_sig = 0)."""
    sets = load_gene_sets(gene_sets)
    genes = np.asarray(genes, dtype=object)
    lib = library if library is not None else compile_library(sets, list(genes))
    pr = participation_ratio(F)
    n = n_top_genes(pr, rule, s, clip)
    top = [list(genes[idx]) for idx in top_genes(F, n)]
    queries = {str(i): t for i, t in enumerate(top) if len(t) >= min_genes}
    enr = ora(queries, sets, library=lib, max_q=alpha)
    enr = enr[enr.q_value < alpha].reset_index(drop=True)
    ic = sets.ic
    enr["ic"] = enr["term"].map(ic).astype(float) if ic else np.nan
    feats = pd.DataFrame({"feature": np.arange(F.shape[0]), "pr": pr, "n_top": [len(t) for t in top],
                          "top_genes": [";".join(t[:20]) for t in top]})
    if len(enr):
        g = enr.groupby(enr["query"].astype(int), sort=False)
        best_row = g["q_value"].idxmin()
        best = enr.loc[best_row.to_numpy()].set_index(best_row.index)
        feats["n_sig"] = g.size().reindex(feats.feature, fill_value=0).to_numpy()
        feats["best_term"] = best["term"].reindex(feats.feature).to_numpy()
        feats["best_name"] = best["name"].reindex(feats.feature).to_numpy()
        feats["best_q"] = best["q_value"].reindex(feats.feature).to_numpy()
        feats["max_ic"] = g["ic"].max().reindex(feats.feature).to_numpy()
    else:
        feats["n_sig"] = 0
        feats["best_term"] = feats["best_name"] = None
        feats["best_q"] = feats["max_ic"] = np.nan
    enr = enr.assign(feature=enr["query"].astype(int)).drop(columns="query")
    return MatrixAnnotation(feats, enr, top)


def share_enriched(features: pd.DataFrame) -> float:
    """Fraction of features with at least one significant term ([Y]: 64% SAE vs 34% raw neurons)."""
    return float((features["n_sig"] > 0).mean()) if len(features) else float("nan")


class Comparison(NamedTuple):
    table: pd.DataFrame  # per basis: n_features, n_enriched, share_enriched, median_max_ic
    mannwhitney_u: float  # SAE vs raw neurons on max IC of enriched features (two-sided)
    mannwhitney_p: float


def compare_bases(bases: dict[str, pd.DataFrame], a: str = "sae", b: str = "raw") -> Comparison:
    """Share of enriched features per basis and a Mann-Whitney U test of max IC between bases a and b."""
    from scipy.stats import mannwhitneyu

    rows = []
    for name, f in bases.items():
        rows.append({"basis": name, "n_features": len(f), "n_enriched": int((f["n_sig"] > 0).sum()),
                     "share_enriched": share_enriched(f), "median_max_ic": float(f["max_ic"].median())
                     if f["max_ic"].notna().any() else float("nan")})
    u = p = float("nan")
    if a in bases and b in bases:
        x, y = bases[a]["max_ic"].dropna(), bases[b]["max_ic"].dropna()
        if len(x) and len(y):
            u, p = (float(v) for v in mannwhitneyu(x, y, alternative="two-sided"))
    return Comparison(pd.DataFrame(rows), u, p)


def ica_matrix(sample, F_raw, *, n_components: int | None = None, seed: int = 0, max_iter: int = 200):
    """The ICA baseline's feature x gene matrix from a token sample [n, d] and the raw neurons' F [d,
    n_genes].

    FastICA (unit-variance whitening) finds unmixing W and mean mu on the sample; component c at token x is
    (W (x - mu))_c, so its mean at gene g is W (F_raw[:, g] - mu). Components are oriented so that their
    skew on the sample is positive (the heavy tail is the 'active' side). Returns (F_ica, W, mu)."""
    from sklearn.decomposition import FastICA
    from threadpoolctl import threadpool_limits

    sample = np.asarray(sample, np.float64)
    n_components = min(n_components or sample.shape[1], sample.shape[1], sample.shape[0])
    ica = FastICA(n_components=n_components, whiten="unit-variance", random_state=seed, max_iter=max_iter)
    # one BLAS thread: FastICA's many small eigh / matmul calls run ~20x slower with oversubscribed threads.
    # A ConvergenceWarning (max_iter reached) is left to the caller: interpret_sae counts it in its summary.
    with threadpool_limits(1):
        S = ica.fit_transform(sample)
    W, mu = ica.components_, ica.mean_
    skew = ((S - S.mean(0)) ** 3).mean(0)
    sign = np.where(skew < 0, -1.0, 1.0)
    W = W * sign[:, None]
    return W @ (np.asarray(F_raw, np.float64) - mu[:, None]), W, mu
