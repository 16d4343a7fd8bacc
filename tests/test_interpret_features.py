"""Feature x gene matrix, participation ratio, top genes, gene filters, overlap graph, gene-level properties
and cell-level AMI/F1, each against a plain numpy / scipy / scikit-learn computation."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_mutual_info_score, f1_score

from sae_fast.interpret import (
    FeatureGeneAccumulator,
    association_scores,
    best_features,
    expression_spearman,
    family_shares,
    gene_family,
    gene_filter,
    ica_matrix,
    n_top_genes,
    normalise_by_max,
    overlap_coefficients,
    overlap_graph,
    participation_ratio,
    top_genes,
)
from sae_fast.interpret.cells import AMI_THRESHOLDS, F1_THRESHOLDS
from sae_fast.ops import SparseCode


def test_participation_ratio_equals_numpy_formula():
    rng = np.random.default_rng(0)
    F = rng.random((37, 1001)) ** 4
    F[3] = 0
    F[4] = 0
    F[4, 7] = 2.5
    F[5] = 0
    F[5, :10] = 1.0
    ref = (F ** 2).sum(1) ** 2 / np.where((F ** 4).sum(1) > 0, (F ** 4).sum(1), 1)
    pr = participation_ratio(F)
    np.testing.assert_allclose(pr, ref, rtol=1e-12, atol=0)
    assert pr[3] == 0 and pr[4] == pytest.approx(1) and pr[5] == pytest.approx(10)
    np.testing.assert_allclose(participation_ratio(F.astype(np.float32)), ref, rtol=1e-6)


def test_accumulator_equals_dense_numpy():
    rng = np.random.default_rng(1)
    n_feat, n_genes, n_cells, k = 29, 17, 11, 5
    dense_sum = np.zeros((n_feat, n_genes))
    counts = np.zeros(n_genes)
    cmax = np.zeros((n_cells, n_feat))
    csum = np.zeros((n_cells, n_feat))
    ctok = np.zeros(n_cells)
    acc = FeatureGeneAccumulator(n_feat, n_genes, n_cells, max_pairs=10**6)
    pairs = []
    for _ in range(4):
        N = 53
        ind = torch.stack([torch.randperm(n_feat)[:k] for _ in range(N)])
        val = torch.rand(N, k)
        val[val < 0.3] = 0  # padding / inactive entries
        genes = torch.tensor(rng.integers(-1, n_genes, N))
        cells = torch.tensor(rng.integers(0, n_cells, N))
        expr = torch.rand(N)
        acc.add(SparseCode(ind, val), genes, cells, expr)
        dense = SparseCode(ind, val).to_dense(n_feat).double().numpy()
        for t in range(N):
            g, c = int(genes[t]), int(cells[t])
            if g < 0:
                continue
            dense_sum[:, g] += dense[t]
            counts[g] += 1
            cmax[c] = np.maximum(cmax[c], dense[t])
            csum[c] += dense[t]
            ctok[c] += 1
            pairs += [(f, dense[t, f], float(expr[t])) for f in range(n_feat) if dense[t, f] != 0]
    res = acc.result()
    np.testing.assert_allclose(res.F, dense_sum / np.maximum(counts, 1), rtol=1e-12)
    np.testing.assert_allclose(res.cell_max, cmax, rtol=1e-6)
    np.testing.assert_allclose(res.cell_mean, csum / np.maximum(ctok, 1)[:, None], rtol=1e-6)
    np.testing.assert_array_equal(res.gene_counts, counts)
    got = np.array(sorted(zip(*(p.tolist() for p in res.pairs))))
    np.testing.assert_allclose(got, np.array(sorted(pairs)), rtol=1e-6)
    # dense activations (raw neurons): negative values kept, max over real tokens only
    acc = FeatureGeneAccumulator(3, 2, 2)
    x = torch.tensor([[-1.0, 2.0, -3.0], [-2.0, 1.0, -0.5]])
    acc.add(x, torch.tensor([0, 1]), torch.tensor([0, 0]))
    r = acc.result()
    np.testing.assert_allclose(r.cell_max[0], [-1.0, 2.0, -0.5])
    np.testing.assert_allclose(r.F, x.T.numpy())
    np.testing.assert_allclose(r.cell_max[1], 0)


def test_top_gene_rules():
    F = np.array([[0.0, 5, 1, 3, 0, 2], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0.0]])
    pr = participation_ratio(F)
    assert n_top_genes([2.4, 2.6, 0.0]).tolist() == [2, 3, 0]
    assert n_top_genes([5.0, 50.0, 500.0], "code", s=0.6).tolist() == [10, 30, 100]
    assert n_top_genes([5.0, 50.0, 500.0], "code", s=1.0).tolist() == [10, 50, 100]
    tops = top_genes(F, [3, 2, 4])
    assert tops[0].tolist() == [1, 3, 5] and len(tops[1]) == 2 and len(tops[2]) == 0
    assert top_genes(F, 10)[0].tolist() == [1, 3, 5, 2]  # zero entries never count as top genes
    assert pr[1] == pytest.approx(6)


def test_gene_filters_by_definition():
    rng = np.random.default_rng(2)
    X = rng.poisson(rng.gamma(0.3, 1.0, size=(1, 300)) * rng.gamma(2, 1, size=(80, 1)), size=(80, 300))
    X[:, 0] = 0
    X[:2, 1] = 1  # rare gene: fails paper, passes code (2.5% of cells non-zero)
    a = ad.AnnData(sp.csr_matrix(X.astype(np.float32)))
    cpm = np.log1p(X / X.sum(1, keepdims=True) * 1e6)
    paper = ((X != 0).mean(0) >= 0.5) & (cpm.mean(0) >= 0.01)
    code = (X.mean(0) > 0.01) | ((X != 0).mean(0) > 0.005)
    np.testing.assert_array_equal(gene_filter(a, "paper"), paper)
    np.testing.assert_array_equal(gene_filter(a, "code"), code)
    assert 0 < paper.sum() < code.sum() < 300 and not code[0] and code[1] and not paper[1]
    assert gene_filter(a, "none").all()


def test_overlap_graph_by_brute_force():
    top = [["A", "B", "C", "D"], ["A", "B", "E"], ["X", "Y"], ["Y", "Z", "W", "V"], ["Q"], ["E", "R"]]
    coef = overlap_coefficients(top).toarray()
    for i in range(len(top)):
        for j in range(len(top)):
            ref = 0 if i == j else len(set(top[i]) & set(top[j])) / np.sqrt(len(top[i]) * len(top[j]))
            assert coef[i, j] == pytest.approx(ref)
    import pandas as pd

    enr = pd.DataFrame({"feature": [0, 1, 1, 2], "term": ["T1", "T1", "T2", "T2"],
                        "name": ["t1", "t1", "t2", "t2"]})
    g = overlap_graph(top, enr, 0.2)
    # edges: 0-1 (2/sqrt12 = .58), 2-3 (1/sqrt8 = .35), 1-5 (1/sqrt6 = .41); 4 alone
    assert g.component[0] == g.component[1] == g.component[5] and g.component[2] == g.component[3]
    assert len(set(g.component)) == 3
    assert g.components.n_features.tolist() == [3, 2]
    assert g.components.shared_terms[0] == "t1 (2)" and g.components.shared_terms[1] == ""


def test_gene_families_and_expression_spearman():
    genes = ["IGHG1", "IGKC", "MT-CO1", "MT2A", "HLA-DRA", "RPL13", "RPS27A", "H2AC6", "HIST1H4C", "TRBV7-2",
             "TRAC", "CD3E", "MTOR", "RPLP0"]
    fam = gene_family(genes).tolist()
    assert fam == ["immunoglobulin", "immunoglobulin", "mitochondrial", "metallothionein", "hla", "ribosomal",
                   "ribosomal", "histone", "histone", "tcr", "tcr", "", "", "ribosomal"]
    F = np.zeros((2, len(genes)))
    F[0, [5, 6, 11]] = [1.0, 0.5, 0.9]  # 2 of 3 strongly active genes ribosomal
    F[0, 0] = 0.2  # below 0.3 of the max: ignored
    shares = family_shares(F, genes)
    assert shares.loc[0, "ribosomal"] == pytest.approx(2 / 3) and shares.loc[0, "immunoglobulin"] == 0
    assert shares.loc[1].sum() == 0
    rng = np.random.default_rng(3)
    f = rng.integers(0, 4, 500)
    a = rng.random(500)
    e = a * (f == 1) + rng.random(500)
    rho = expression_spearman((f, a, e), 5, min_pairs=10)
    for i in range(4):
        assert rho[i] == pytest.approx(spearmanr(a[f == i], e[f == i]).statistic, abs=1e-12)
    assert np.isnan(rho[4])


def test_ica_baseline_is_linear_in_the_raw_matrix():
    rng = np.random.default_rng(4)
    S = rng.laplace(size=(3000, 4))
    A = rng.normal(size=(4, 4))
    X = S @ A.T
    F_raw = rng.normal(size=(4, 7))
    F_ica, W, mu = ica_matrix(X, F_raw, seed=0)
    np.testing.assert_allclose(F_ica, W @ (F_raw - mu[:, None]))
    comps = (X - mu) @ W.T
    assert (((comps - comps.mean(0)) ** 3).mean(0) > 0).all()
    # the recovered components are the sources up to order and scale
    corr = np.abs(np.corrcoef(comps.T, S.T)[:4, 4:])
    assert (corr.max(1) > 0.95).all()


def test_ami_f1_equal_sklearn():
    rng = np.random.default_rng(5)
    n, F = 83, 9
    labels = rng.choice(["a", "b", "c"], n)
    X = rng.random((n, F)) ** 2
    X[:, 0] = 0  # never active
    X[:, 1] = 1  # always active
    X[:, 2] = (labels == "b") * (0.5 + rng.random(n))  # a planted "b" feature
    X[:4, 3] = 3.0
    Xn = normalise_by_max(X)
    s = association_scores(Xn, labels)
    for c, cls in enumerate(s.classes):
        y = labels == cls
        for f in range(F):
            amis = [adjusted_mutual_info_score(y, Xn[:, f] > t) for t in AMI_THRESHOLDS]
            f1s = [f1_score(y, Xn[:, f] > t, zero_division=0) for t in F1_THRESHOLDS]
            assert s.ami[c, f] == pytest.approx(max(amis), abs=1e-12)
            assert s.f1[c, f] == pytest.approx(max(f1s), abs=1e-12)
            assert s.ami_threshold[c, f] == AMI_THRESHOLDS[int(np.argmax(amis))]
    assert s.ami[s.classes.index("b"), 2] == pytest.approx(1.0)
    import pandas as pd

    table = best_features(Xn, pd.DataFrame({"cell_type": labels}), ["cell_type"], top=2)
    assert len(table) == 6 and table.query("label == 'b' and rank == 1").feature.item() == 2
