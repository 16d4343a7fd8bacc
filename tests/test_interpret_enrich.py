"""ORA against its definitions: scipy's hypergeometric tail, BH from statsmodels, and gseapy.enrich itself."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import anndata as ad
import mpmath
import numpy as np
import pytest
from scipy.stats import hypergeom
from statsmodels.stats.multitest import multipletests

from sae_fast.errors import UserError
from sae_fast.interpret import benjamini_hochberg, load_gene_sets, ora

PBMC = Path(__file__).resolve().parent / "fixtures" / "pbmc3k_decoupler160_counts.h5ad"


def random_library(rng, n_genes=700, n_sets=150):
    genes = [f"G{i}" for i in range(n_genes)]
    sets = {f"T{j}": list(rng.choice(genes, rng.integers(1, 120), replace=False)) for j in range(n_sets)}
    return genes, sets


def test_pvalues_match_scipy_and_bh_matches_statsmodels():
    rng = np.random.default_rng(0)
    genes, sets = random_library(rng)
    background = genes[:650] + ["NOT_IN_ANY_SET"]
    # queries share genes with one set heavily, so both big and tiny p-values occur; one query is empty
    queries = {f"q{i}": list(rng.choice(genes, rng.integers(1, 90), replace=False)) for i in range(40)}
    queries["planted"] = sets["T3"][:60] + ["UNKNOWN_GENE"]
    queries["empty"] = ["UNKNOWN_GENE"]
    df = ora(queries, sets, background)
    assert list(df.columns[:10]) == ["query", "term", "name", "overlap", "query_size", "set_size",
                                     "background_size", "p_value", "q_value", "log10_p"]
    bg = set(background)
    assert (df.background_size == len(bg)).all() and "empty" not in set(df["query"])
    # overlap, sizes and genes by plain set algebra
    for r in df.sample(200, random_state=0).itertuples():
        q = set(queries[r.query]) & bg
        s = set(sets[r.term]) & bg
        assert (r.query_size, r.set_size, r.overlap) == (len(q), len(s), len(q & s))
        assert set(r.overlap_genes.split(";")) == q & s
    # every (query, term) with overlap >= 1 appears exactly once
    expected = sum(1 for q in queries.values() for s in sets.values() if set(q) & set(s) & bg)
    assert len(df) == expected
    ref = hypergeom.sf(df.overlap - 1, df.background_size, df.set_size, df.query_size)
    np.testing.assert_allclose(df.p_value, ref, rtol=1e-9, atol=0)
    for name, sub in df.groupby("query", observed=True):
        p_ref = hypergeom.sf(sub.overlap - 1, sub.background_size, sub.set_size, sub.query_size)
        q_ref = multipletests(p_ref, method="fdr_bh")[1]
        np.testing.assert_allclose(sub.q_value, q_ref, rtol=1e-9, atol=0, err_msg=str(name))
        assert (np.diff(sub.p_value.to_numpy()) >= 0).all()  # sorted by p within a query
    np.testing.assert_allclose(benjamini_hochberg(df.p_value[:50]),
                               multipletests(df.p_value[:50], method="fdr_bh")[1])


def exact_sf(x, M, n, N):
    mpmath.mp.dps = 50
    total = mpmath.binomial(M, N)
    return sum(mpmath.binomial(n, i) * mpmath.binomial(M - n, N - i) for i in range(x, min(n, N) + 1)) / total


def test_tiny_pvalues_stay_positive_and_exact_in_log_space():
    # big identical query and set: p far below 1e-300 (and below the smallest double for the largest)
    M = 20000
    cases = [(300, 300), (1000, 1000), (2000, 2000), (150, 400)]
    genes = [f"G{i}" for i in range(M)]
    for n_q, n_s in cases:
        sets = {"S": genes[:n_s]}
        df = ora({"q": genes[:n_q]}, sets, genes)
        x = min(n_q, n_s)
        exact = exact_sf(x, M, n_s, n_q)
        assert df.p_value.iloc[0] > 0 and np.isfinite(df.p_value.iloc[0])
        assert abs(df.log10_p.iloc[0] - float(mpmath.log10(exact))) < 1e-9 * abs(float(mpmath.log10(exact)))
        scipy_p = hypergeom.sf(x - 1, M, n_s, n_q)
        if scipy_p >= 1e-300:
            assert df.p_value.iloc[0] == pytest.approx(scipy_p, rel=1e-9)
    # p near 1 (overlap 1 of two big lists) and a mid-range tail checked against the exact sum too
    for x, n, N in [(1, 3000, 3000), (40, 2000, 300), (5, 30, 100)]:
        sets = {"S": genes[:n]}
        q = genes[n - x: n - x + N]
        df = ora({"q": q}, sets, genes)
        assert df.overlap.iloc[0] == x
        assert df.p_value.iloc[0] == pytest.approx(float(exact_sf(x, M, n, N)), rel=1e-9)


@pytest.fixture(scope="module")
def go_bp():
    return load_gene_sets("go_bp")


def test_matches_gseapy_enrich_on_real_go(go_bp):
    import gseapy

    logging.getLogger("gseapy").setLevel(logging.WARNING)
    background = list(ad.read_h5ad(PBMC).var_names)
    markers = load_gene_sets("immune_markers")
    rng = np.random.default_rng(3)
    queries = {"b_cell": markers["B cell"], "nk": markers["NK cell"] if "NK cell" in markers else
               list(rng.choice(background, 30, replace=False)),
               "random": list(rng.choice(background, 60, replace=False))}
    ours = ora(queries, go_bp, background)
    for name, genes in queries.items():
        ref = gseapy.enrich(gene_list=genes, gene_sets=dict(go_bp), background=background, outdir=None,
                            no_plot=True, cutoff=1.0).results
        mine = ours[ours["query"] == name].set_index("term")
        ref = ref.set_index("Term")
        assert set(mine.index) == set(ref.index), name
        ref = ref.loc[mine.index]
        np.testing.assert_allclose(mine.p_value, ref["P-value"], rtol=1e-9, atol=0)
        np.testing.assert_allclose(mine.q_value, ref["Adjusted P-value"], rtol=1e-9, atol=0)
        overlap = (mine.overlap.astype(str) + "/" + mine.set_size.astype(str)).tolist()
        assert overlap == ref["Overlap"].tolist()
    # the B-cell markers hit B-cell biology
    top = ours[ours["query"] == "b_cell"].head(10)["name"].str.cat(sep=" | ")
    assert "B cell" in top


def test_gene_set_sources(tmp_path, go_bp):
    assert len(go_bp) == 9035 and go_bp.names["GO:0051607"] == "defense response to virus"
    assert go_bp.ic["GO:0051607"] == pytest.approx(4.31, abs=0.01)
    assert {"ISG15", "MX1", "IFIT1", "OAS1"} <= set(go_bp["GO:0051607"])
    for name in ("go_cc", "go_mf", "immune_markers"):
        assert len(load_gene_sets(name)) > 10
    text = "A\tfirst set\tX\tY\tZ\nB\t\tY\tW\n"
    (tmp_path / "s.gmt").write_text(text)
    with gzip.open(tmp_path / "s.gmt.gz", "wt") as fh:
        fh.write(text)
    for p in ("s.gmt", "s.gmt.gz"):
        s = load_gene_sets(tmp_path / p)
        assert dict(s) == {"A": ["X", "Y", "Z"], "B": ["Y", "W"]} and s.names == {"A": "first set", "B": "B"}
    assert dict(load_gene_sets({"A": ["X", "X", "Y"]})) == {"A": ["X", "Y"]}
    df = ora({"q": ["X", "Y"]}, tmp_path / "s.gmt", ["X", "Y", "Z", "W", "V"])
    assert set(df.term) == {"A", "B"} and df.set_index("term").loc["A", "name"] == "first set"
    with pytest.raises(UserError, match="unknown gene sets"):
        load_gene_sets("go_nonsense")
    with pytest.raises(UserError, match="not found"):
        load_gene_sets(tmp_path / "missing.gmt")
    with pytest.raises(UserError, match="shares a gene"):
        ora({"q": ["X"]}, {"A": ["X"]}, ["Q", "R"])
    empty = ora({"q": ["X"]}, {"A": ["Y", "Z"]}, ["X", "Y", "Z"])
    assert len(empty) == 0 and "q_value" in empty
