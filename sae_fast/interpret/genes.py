"""Gene-level properties of features, as in [P]: expression-level features and gene-family features.

- Expression level: the Spearman correlation, per feature, between its activation and the input expression
  at the tokens where it is active. A feature with rho near 1 tracks "how much" a gene is expressed rather
  than "which".
- Gene families: per feature, of the genes where its normalised mean activation F[i, g] / max_g F[i, g]
  exceeds 0.3, the share in each family (immunoglobulins, MT- genes, HLA, ribosomal proteins, histones, TCR
  segments, metallothioneins), recognised from HGNC symbols. [P] counts activations per token; we count
  genes of the feature x gene matrix, which needs no second pass over the data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

GENE_FAMILIES = {
    "immunoglobulin": r"^IG[HKL][VDJCGMAE]|^IGLL",
    "mitochondrial": r"^MT-",
    "hla": r"^HLA-",
    "ribosomal": r"^RP[LS]\d+[A-Z]?\d*$|^RPLP[0-2]$|^RPSA$",
    "histone": r"^HIST\d|^H1-\d|^H2A[CZWXJ]|^H2B[CUW]|^H3C\d|^H3-[35]|^H4C\d|^H3F3|^H2AF|^H1F",
    "tcr": r"^TR[ABDG][VDJC]",
    "metallothionein": r"^MT\d",
}


def gene_family(genes) -> pd.Series:
    """The family of each gene symbol (one of GENE_FAMILIES) or "" when none."""
    genes = pd.Index(map(str, genes))
    out = pd.Series("", index=genes)
    for fam, pat in GENE_FAMILIES.items():
        hit = genes.str.contains(pat, regex=True) & (out.to_numpy() == "")
        out[hit] = fam
    return out


def family_shares(F, genes, threshold: float = 0.3) -> pd.DataFrame:
    """[n_features, families]: each feature's share of strongly active genes (F / row max > threshold)
    per family."""
    F = np.asarray(F, np.float64)
    m = F.max(1, keepdims=True)
    active = F / np.where(m > 0, m, 1.0) > threshold
    fam = gene_family(genes).to_numpy()
    n = active.sum(1)
    cols = {f: active[:, fam == f].sum(1) / np.maximum(n, 1) for f in GENE_FAMILIES}
    return pd.DataFrame(cols)


def expression_spearman(pairs, n_features: int, min_pairs: int = 10) -> np.ndarray:
    """Spearman rho per feature between activation and expression at its active tokens (NaN with < min_pairs).

    pairs: (feature [n], activation [n], expression [n]) as kept by FeatureGeneAccumulator."""
    from scipy.stats import rankdata

    rho = np.full(n_features, np.nan)
    if pairs is None or pairs[0].size == 0:
        return rho
    f, a, e = pairs
    order = np.argsort(f, kind="stable")
    f, a, e = f[order], a[order], e[order]
    bounds = np.searchsorted(f, np.arange(n_features + 1))
    for i in range(n_features):
        lo, hi = bounds[i], bounds[i + 1]
        if hi - lo < min_pairs:
            continue
        ra, re_ = rankdata(a[lo:hi]), rankdata(e[lo:hi])
        sa, se = ra.std(), re_.std()
        if sa > 0 and se > 0:
            rho[i] = float(np.mean((ra - ra.mean()) * (re_ - re_.mean())) / (sa * se))
    return rho

