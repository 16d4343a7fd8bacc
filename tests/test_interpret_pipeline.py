"""End-to-end interpretation: planted GO features are recovered; interpret_sae runs on a fake model and SAE;
results are written atomically and summarised."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from sae_fast.errors import UserError
from sae_fast.interpret import (
    annotate_matrix,
    format_summary,
    interpret_sae,
    load_gene_sets,
    write_results,
)
from sae_fast.models.base import CellBatch, GeneAlignment, PreparedData, ScFM
from sae_fast.ops import SparseCode

PBMC = Path(__file__).resolve().parent / "fixtures" / "pbmc3k_decoupler160_counts.h5ad"


@pytest.fixture(scope="module")
def pbmc():
    return ad.read_h5ad(PBMC)


def planted_terms(genes, n_terms, rng, lo=15, hi=60):
    """Random GO BP terms with lo..hi genes inside `genes`, pairwise sharing few genes."""
    go = load_gene_sets("go_bp")
    gs = set(genes)
    cands = [t for t, g in go.items() if lo <= len(gs.intersection(g)) <= hi]
    chosen, used = [], set()
    for t in rng.permutation(cands):
        members = gs.intersection(go[t])
        if len(members & used) <= 2:
            chosen.append(t)
            used |= members
        if len(chosen) == n_terms:
            break
    return go, chosen


def test_planted_features_recover_their_go_terms(pbmc):
    """Each feature is planted on the PBMC genes of one GO BP term (+ noise); ORA must rank that term first
    or among its significant terms, with the background = all PBMC genes."""
    rng = np.random.default_rng(0)
    genes = list(pbmc.var_names)
    go, terms = planted_terms(genes, 12, rng)
    col = {g: j for j, g in enumerate(genes)}
    F = np.abs(rng.normal(0, 0.01, (len(terms) + 2, len(genes))))  # two pure-noise features at the end
    F[F < 0.025] = 0
    for i, t in enumerate(terms):
        idx = [col[g] for g in go[t] if g in col]
        F[i, idx] = 1.0 + 0.1 * rng.random(len(idx))
    res = annotate_matrix(F, genes, go, rule="paper")
    f = res.features
    for i, t in enumerate(terms):
        sig = set(res.enrichment.loc[res.enrichment.feature == i, "term"])
        assert t in sig, (i, t)
        assert f.loc[i, "n_sig"] >= 1
        # the planted term is the best-scoring one or ties with a term holding the very same genes
        best = f.loc[i, "best_term"]
        assert best == t or set(go[best]) & set(genes) >= set(go[t]) & set(genes)
    assert f.loc[len(terms), "n_sig"] == 0 and f.loc[len(terms) + 1, "n_sig"] == 0
    assert np.isfinite(f.loc[: len(terms) - 1, "max_ic"]).all()


class FakeModel(ScFM):
    """A stand-in scFM: hidden[token] = expression * E[gene] (one fixed vector per gene), no real network."""

    name = "fake"

    def __init__(self, genes, d, seed=0):
        super().__init__()
        self.genes = list(genes)
        self.n_layers, self.d_model = 2, d
        g = torch.Generator().manual_seed(seed)
        self.E = torch.randn(len(genes), d, generator=g)

    def prepare(self, adata, batch_size=8, **kw):
        col = {g: j for j, g in enumerate(adata.var_names)}
        take = [col[g] for g in self.genes]
        X = np.asarray(adata.X[:, take].todense() if hasattr(adata.X, "todense") else adata.X[:, take])
        T = len(self.genes) + 1  # one special token per cell (gene id -1)

        def it():
            for s in range(0, adata.n_obs, batch_size):
                x = torch.tensor(np.log1p(X[s:s + batch_size]), dtype=torch.float32)
                B = x.shape[0]
                gid = torch.cat([torch.arange(len(self.genes)).expand(B, -1), torch.full((B, 1), -1)], 1)
                expr = torch.cat([x, torch.zeros(B, 1)], 1)
                mask = torch.ones(B, T, dtype=torch.bool)
                yield CellBatch({"x": expr}, gid, torch.arange(s, s + B), mask, expr)

        return PreparedData(it, np.arange(adata.n_obs), batch_size, GeneAlignment(len(self.genes), self.genes))

    def forward(self, batch, layer=None, hook=None, *, stop=False, start=None):
        from sae_fast.models.base import ModelOutput

        gid = batch.gene_ids.clamp(min=0)
        h = batch.expression[..., None] * self.E[gid] + 0.01
        return ModelOutput(h, None, None)


class FakeSAE(torch.nn.Module):
    """TopK SAE whose features read the residual direction of one planted gene group each."""

    def __init__(self, W_enc, k):
        super().__init__()
        self.W_enc = torch.nn.Parameter(W_enc)
        self.W_dec = torch.nn.Parameter(W_enc.clone())
        self.k = k

    def encode(self, x):
        pre = x @ self.W_enc.T
        v, i = pre.topk(self.k, dim=1)
        return SparseCode(i, v.relu())


def dense_codes(sae, model, adata, layer=1):
    """Reference: every gene token's dense SAE activations [cells, genes, features], computed directly."""
    out = []
    for batch in model.prepare(adata, batch_size=32):
        h = model.forward(batch, layer=layer).hidden[:, :-1]  # drop the special token (gene id -1)
        code = sae.encode(h.reshape(-1, h.shape[-1]))
        z = torch.zeros(code.indices.shape[0], sae.W_enc.shape[0]).scatter_(1, code.indices, code.values)
        out.append(z.reshape(h.shape[0], h.shape[1], -1))
    return torch.cat(out).detach().double().numpy()


def test_interpret_sae_end_to_end(pbmc, tmp_path):
    """Features planted on the genes of 6 GO terms find their terms; F, the per-cell pools, the enriched shares
    and the printed summary equal direct recomputations."""
    rng = np.random.default_rng(1)
    a = pbmc[:, :].copy()
    genes_all = list(a.var_names)
    expressed = [g for g, n in zip(genes_all, (a.X > 0).sum(0).A1) if n >= 0.3 * a.n_obs]
    go, terms = planted_terms(expressed, 6, rng, 8, 40)
    # the model's vocabulary: the planted terms' expressed genes + some others, all in the data
    vocab = list(dict.fromkeys([g for t in terms for g in go[t] if g in set(expressed)]
                               + list(rng.choice(genes_all, 150, replace=False))))
    model = FakeModel(vocab, d=24)
    # term i's (expressed) genes share a direction u_i of the residual stream; feature i reads u_i, 10 more read noise
    U = torch.linalg.qr(torch.randn(24, 16, generator=torch.Generator().manual_seed(0)))[0].T
    for i, t in enumerate(terms):
        model.E[[vocab.index(g) for g in go[t] if g in set(expressed)]] += 4 * U[i]
    sae = FakeSAE(U.clone(), k=4)
    res = interpret_sae(sae, model, a, layer=1, gene_filter="none", label_keys=["cell_type"], ica_sample=2000)
    s, f = res.summary, res.features
    assert s["n_features"] == 16 and s["n_cells"] == 160 and s["n_tokens"] == 160 * len(vocab)
    for i, t in enumerate(terms):  # each planted feature finds its term
        assert t in set(res.enrichment[(res.enrichment.basis == "sae") & (res.enrichment.feature == i)].term)
    # F (mean activation of each feature at each gene's token) and the per-cell max / mean pools
    Z = dense_codes(sae, model, a)
    col = [vocab.index(g) for g in res.genes]
    np.testing.assert_allclose(res.F, Z.mean(0)[col].T, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.adata.obsm["X_sae_max"], Z.max(1), rtol=1e-5)
    np.testing.assert_allclose(res.adata.obsm["X_sae_mean"], Z.mean(1), rtol=1e-5)
    # enriched shares: the features with a significant term in the enrichment table, per basis
    for r in res.bases.itertuples():
        sig = res.enrichment[(res.enrichment.basis == r.basis) & (res.enrichment.q_value < 0.05)].feature.nunique()
        assert r.n_enriched == sig and r.share_enriched == sig / r.n_features == s[f"share_enriched_{r.basis}"]
    assert dict(zip(res.bases.basis, res.bases.n_features)) == {"sae": 16, "raw": 24, "ica": 24}
    assert (f.n_sig > 0).sum() == res.bases.set_index("basis").n_enriched["sae"]
    assert isinstance(s["ica_converged"], bool)
    text = format_summary(res)
    for r in res.bases.itertuples():
        assert f"{r.basis:>4}: {r.n_enriched}/{r.n_features} features with >= 1 significant term" in text
    assert ("reached its 200-iteration limit" in text) == (not s["ica_converged"])
    assert set(res.cell_association.key) == {"cell_type"}
    # top genes with their activations: each feature's listed top genes, in order, with F at that gene
    tg = res.top_genes
    for i in range(16):
        rows = tg[tg.feature == i].sort_values("rank")
        top = f.top_genes[i].split(";") if isinstance(f.top_genes[i], str) else list(f.top_genes[i])
        assert rows.gene.tolist() == [g for g in top if g][:20]
        np.testing.assert_allclose(rows.activation, res.F[i, [res.genes.index(g) for g in rows.gene]])
    with pytest.raises(UserError, match="feature 99 is out of range"):
        format_summary(res, features=[99])
    paths = write_results(res, tmp_path / "out")
    back = ad.read_h5ad(tmp_path / "out" / "annotated.h5ad")
    np.testing.assert_allclose(back.obsm["X_sae_max"], res.adata.obsm["X_sae_max"])
    table = paths[0]
    df = pd.read_parquet(table) if table.suffix == ".parquet" else pd.read_csv(table)
    assert df.n_sig.tolist() == f.n_sig.tolist()
    assert df.best_term.fillna("").astype(str).tolist() == f.best_term.fillna("").astype(str).tolist()
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_ica_convergence_is_reported():
    """FastICA's ConvergenceWarning is counted into the summary, not hidden: Gaussian data has no independent
    components to converge to; a Laplace mixture does."""
    from sae_fast.interpret.pipeline import _ica

    rng = np.random.default_rng(0)
    F_raw = rng.random((8, 30))
    assert _ica(rng.normal(size=(2000, 8)), F_raw, 0)[1] is False
    assert _ica(rng.laplace(size=(2000, 8)) @ rng.normal(size=(8, 8)).T, F_raw, 0)[1] is True


def test_interpret_sae_rejects_mismatched_d(pbmc):
    model = FakeModel(list(pbmc.var_names[:50]), d=8)
    sae = FakeSAE(torch.randn(4, 9), k=2)
    with pytest.raises(UserError, match="d=9"):
        interpret_sae(sae, model, pbmc, layer=1)


def test_shards_path_equals_model_path(pbmc, tmp_path):
    """Tokens read back from activation shards give the same F and pooled activations as the forward pass."""
    from sae_fast.activations.shards import ShardWriter, open_shards
    from sae_fast.interpret.pipeline import model_tokens, shard_tokens

    a = pbmc[:24].copy()
    model = FakeModel(list(a.var_names[:60]), d=8)
    sae = FakeSAE(torch.randn(12, 8), k=3)
    w = ShardWriter(tmp_path / "acts", 8, dtype="float32", shard_tokens=500, meta={"genes": model.genes,
                                                                                     "layer": 1})
    for x, g, c, _ in model_tokens(model, a, 1, batch_size=5):
        w.add(x, c, g)
    w.close()
    kw = dict(gene_filter="none", baselines=["raw"], markers="", label_keys=["cell_type"])
    direct = interpret_sae(sae, model, a.copy(), 1, **kw)
    shards = open_shards(tmp_path / "acts")
    via = interpret_sae(sae, model, a.copy(), 1, tokens=shard_tokens(shards, model, batch_tokens=333), **kw)
    np.testing.assert_allclose(via.F, direct.F, rtol=1e-6)
    np.testing.assert_allclose(via.adata.obsm["X_sae_max"], direct.adata.obsm["X_sae_max"], rtol=1e-6)
    assert via.features.expr_spearman.isna().all() and direct.summary["n_tokens"] == via.summary["n_tokens"]
    other = FakeModel(list(a.var_names[1:61]), d=8)
    with pytest.raises(UserError, match="differ"):
        next(iter(shard_tokens(shards, other)))


def test_cli_rejects_bad_feature_index(tmp_path, capsys):
    from sae_fast.cli import main
    from sae_fast.sae.modules import SAEConfig, SparseAutoencoder

    sae = SparseAutoencoder.from_config(SAEConfig(arch="topk", d_in=8, n_features=16, k=2))
    sae.save(tmp_path / "sae")
    rc = main(["interpret", "--sae", str(tmp_path / "sae"), "--layer", "0", "--out", str(tmp_path / "o"),
               "--features", "3", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "--features 16 is out of range" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    rc = main(["interpret", "--sae", str(tmp_path / "missing"), "--layer", "0", "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing" in capsys.readouterr().err
