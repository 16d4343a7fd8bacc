"""Contrastive steering: closer fraction, gap fraction and binomial tests against independent numpy/scipy
computations; the cached prefix (memory and memory-mapped) and gradient checkpointing give the same alphas as
each other; bad input is one line naming the culprit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats as st
import torch
from test_steer_core import N_GENES, _aido, _counts, _sae

from sae_fast.errors import UserError
from sae_fast.steer import Scale, contrast, steer
from sae_fast.steer.contrastive import gap_analysis

LAYER = 1


@pytest.fixture(scope="module")
def setup():
    model = _aido(seed=4)
    adata = _counts(20, [f"G{i}" for i in range(N_GENES - 2)], seed=5)
    X = adata.X.toarray()
    b = (adata.obs.cell_type == "B").to_numpy()
    X[np.ix_(b, range(10))] *= 8  # two distinct cell types: B high on G0..G9, A on G10..G19
    X[np.ix_(~b, range(10, 20))] *= 8
    adata.X = sp.csr_matrix(X)
    sae = _sae(model.d_model, 64, 8, seed=1)
    return model, adata, sae


def _run(setup, **kw):
    model, adata, sae = setup
    opts = dict(features=list(range(0, 64, 2)), epochs=3, deg_alpha=1.0, lr=0.2, batch_size=2, heldout=0.25, seed=0)
    opts.update(kw)
    return contrast(sae, model, adata, source="A", target="B", label="cell_type", layer=LAYER, **opts)


@pytest.fixture(scope="module")
def result(setup):
    return _run(setup)


def test_closer_and_gap_fractions_match_an_independent_computation(setup, result):
    model, adata, sae = setup
    src = np.flatnonzero(adata.obs.cell_type == "A")
    tgt = np.flatnonzero(adata.obs.cell_type == "B")
    alphas = dict(zip(result.alphas.feature, result.alphas.alpha))
    assert any(abs(a - 1) > 1e-3 for a in alphas.values())  # the optimisation moved
    s = steer(sae, model, adata[src].copy(), Scale(alphas), layer=LAYER, predictions=True)
    t = steer(sae, model, adata[tgt].copy(), Scale({}), layer=LAYER, predictions=True)
    mu = t.obsm["X_emb_base"].astype(np.float64).mean(0)
    pre = np.linalg.norm(s.obsm["X_emb_base"] - mu, axis=1)
    post = np.linalg.norm(s.obsm["X_emb_steered"] - mu, axis=1)
    closer = post < pre
    assert result.closer_fraction == pytest.approx(closer.mean())
    held = result.cells["heldout"].to_numpy()
    assert held.sum() == round(0.25 * src.size)
    assert result.closer_fraction_heldout == pytest.approx(closer[held].mean())
    np.testing.assert_allclose(result.cells["dist_post"], post, rtol=1e-5)

    # gap fraction: expressed ∩ cell-type DEGs (ttest_ind) ∩ steering DEGs (ttest_rel), [Y]'s code; both
    # tests at family-wise level deg_alpha = 1 (Bonferroni over the expressed genes): this tiny random model
    # separates the two cell types only weakly
    ps, pb, pt = (x.astype(np.float64) for x in (s.layers["pred_steered"], s.layers["pred_base"],
                                                 t.layers["pred_base"]))
    X = adata.X.toarray()
    genes = list(s.var_names)
    cols = [list(adata.var_names).index(g) for g in genes]
    expressed = (X[:, cols].mean(0) > 0.01) | ((X[:, cols] != 0).mean(0) > 0.005)
    m = expressed.sum()
    _, p_ct = st.ttest_ind(pt, pb, axis=0)
    t_rel, p_rel = st.ttest_rel(ps, pb, axis=0)
    p_ct, p_rel = np.nan_to_num(p_ct, nan=1.0), np.nan_to_num(p_rel, nan=1.0)
    keep = expressed & (p_ct < 1.0 / m) & (p_rel < 1.0 / m) & (np.abs(np.nan_to_num(t_rel)) > 0)
    srcm, tgtm, stm = pb.mean(0)[keep], pt.mean(0)[keep], ps.mean(0)[keep]
    correct = np.sign(stm - srcm) == np.sign(tgtm - srcm)
    up = tgtm > srcm
    g = result.gap_summary
    assert g["n_genes"] == keep.sum() and g["n_up"] == up.sum() and g["n_down"] == (~up).sum()
    assert keep.sum() >= 2  # not vacuous
    if up.any():
        assert g["share_correct_up"] == pytest.approx(correct[up].mean())
        assert g["binom_p_up"] == pytest.approx(st.binomtest(int(correct[up].sum()), int(up.sum()), 0.5,
                                                             alternative="greater").pvalue)
    gap = (stm - srcm) / (tgtm - srcm)
    assert g["median_gap"] == pytest.approx(np.median(gap), rel=1e-6)
    assert set(result.gap["gene"]) == {gn for gn, k in zip(genes, keep) if k}


def test_gap_analysis_against_numpy():
    rng = np.random.default_rng(0)
    n = 300
    src, tgt = rng.normal(size=n), rng.normal(size=n)
    tgt[:3] = src[:3]  # zero denominators: clamped to 1e-6
    steered = src + 0.7 * (tgt - src) + rng.normal(0, 0.3, n)
    keep = rng.random(n) < 0.8
    df, s = gap_analysis([f"g{i}" for i in range(n)], src, tgt, steered, keep)
    a, b, c = src[keep], tgt[keep], steered[keep]
    den = np.where(np.abs(b - a) < 1e-6, np.where(b - a < 0, -1e-6, 1e-6), b - a)
    correct = np.sign(c - a) == np.sign(b - a)
    up = b > a
    assert s["share_correct_up"] == pytest.approx(correct[up].mean())
    assert s["share_correct_down"] == pytest.approx(correct[~up].mean())
    for side, m in (("up", up), ("down", ~up)):
        assert s[f"binom_p_{side}"] == pytest.approx(
            st.binomtest(int(correct[m].sum()), int(m.sum()), 0.5, alternative="greater").pvalue)
    assert s["median_gap"] == pytest.approx(np.median((c - a) / den))
    order = np.argsort(-np.abs(b - a), kind="stable")
    np.testing.assert_allclose(df["cum_share_correct"], np.cumsum(correct[order]) / np.arange(1, keep.sum() + 1))


def test_cache_modes_and_checkpointing_agree(setup, result, tmp_path):
    disk = _run(setup, cache=str(tmp_path / "cache"), checkpointing=True, control=False)
    np.testing.assert_allclose(disk.alphas["alpha"], result.alphas["alpha"], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "cache" / "prefix.f32").exists()
    assert result.control["closer_fraction"] >= 0 and len(result.control["features"]) == 32
    assert list(result.history.columns) == ["epoch", "loss", "control_loss"]
    sq = _run(setup, distance="squared", objective="expression", control=False, epochs=1)
    assert np.isfinite(sq.history["loss"]).all()


def test_annotation_picks_features_and_top_terms_by_ic(setup):
    enr = pd.DataFrame({"feature": [2, 2, 6], "term": ["T1", "T2", "T3"], "name": ["low", "high", "x"],
                        "q_value": [0.01, 0.02, 0.03], "ic": [1.0, 5.0, 2.0], "basis": ["sae"] * 3})
    out = _run(setup, features=None, annotation=enr, control=False, epochs=1, lr=1.0, threshold=0.0)
    assert list(out.alphas.feature) == [2, 6]
    assert out.alphas.loc[0, "top_terms"].startswith("high (T2)")


@pytest.mark.parametrize("kw,culprit", [
    (dict(label="nope"), "'nope'"), (dict(source="Z"), "'Z'"), (dict(target="C"), "'C' has 1"),
    (dict(features=[64]), "feature 64"), (dict(heldout=1.0), "heldout")])
def test_bad_input_one_line(setup, kw, culprit, tmp_path):
    model, adata, sae = setup
    adata = adata.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs.iloc[0, 0] = "C"
    args = dict(source="A", target="B", label="cell_type", features=[1, 2], cache=str(tmp_path / "c"))
    args.update(kw)
    with pytest.raises(UserError) as e:
        contrast(sae, model, adata, layer=LAYER, **args)
    assert culprit in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()
    torch.manual_seed(0)
