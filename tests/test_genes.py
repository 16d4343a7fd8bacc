"""Gene identifiers as users have them, and cells without counts, across every model of the zoo.

Symbol vocabularies (AIDO.Cell, scGPT, scFoundation) take Ensembl ids, versioned or not, and symbol columns;
Geneformer's Ensembl vocabulary takes symbols."""

from __future__ import annotations

import gzip

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sae_fast.errors import UserError
from sae_fast.models.genes import id_table, vocabulary_keys

SYMBOLS = ["CD3E", "CD4", "MS4A1", "LYZ", "NKG7", "GNLY"]


def ensembl(symbol: str) -> str:
    return id_table()[1][symbol][0]


def make_model(name: str):
    if name == "aido_cell":
        from sae_fast.models.aido_cell import AIDOCellConfig, random_aido_cell

        cfg = AIDOCellConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                             max_position_embeddings=len(SYMBOLS))
        return random_aido_cell(cfg, SYMBOLS, device="cpu")
    if name == "scgpt":
        from sae_fast.models.scgpt import ScGPTConfig, load_scgpt

        cfg = ScGPTConfig.from_args({"embsize": 16, "nheads": 2, "d_hid": 8, "nlayers": 1})
        return load_scgpt(random_init_config=cfg, vocab=SYMBOLS, device="cpu")
    if name == "scfoundation":
        from sae_fast.models.scfoundation import ScFoundation, ScFoundationConfig

        torch.manual_seed(0)
        cfg = ScFoundationConfig(seq_len=len(SYMBOLS) + 2, hidden_dim=16, depth=1, heads=2, bin_num=10,
                                 pad_token_id=3, mask_token_id=2)
        return ScFoundation(cfg, SYMBOLS)
    pytest.importorskip("transformers")
    from sae_fast.models.geneformer import load_geneformer

    ids = [ensembl(g) for g in SYMBOLS]
    tokens = {"<pad>": 0, "<mask>": 1, **{e: i + 2 for i, e in enumerate(ids)}}
    cfg = dict(vocab_size=len(tokens), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=16, max_position_embeddings=16)
    return load_geneformer(token_dictionary=tokens, gene_median={e: 1.0 + i for i, e in enumerate(ids)},
                           random_init_config=cfg, device="cpu")


@pytest.fixture(scope="module", params=["aido_cell", "scgpt", "scfoundation", "geneformer"])
def model(request):
    return request.param, make_model(request.param)


def adata_with(names, var=None, n=4, seed=0):
    X = np.random.default_rng(seed).poisson(3.0, size=(n, len(SYMBOLS))).astype(np.float32) + 1
    return ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
                      var=pd.DataFrame(var or {}, index=list(names)))


def tokens(prepared):
    batch = next(iter(prepared))
    return {k: v for k, v in batch.inputs.items()}, batch.cell_ids


def test_the_bundled_table():
    """Known pairs (Ensembl release facts), and ids shared by two symbols are not used for Ensembl -> symbol."""
    from sae_fast.datasets import data_path

    to_symbol, to_ensembl = id_table()
    known = {"CD3E": "ENSG00000198851", "CD4": "ENSG00000010610", "LYZ": "ENSG00000090382",
             "MS4A1": "ENSG00000156738", "GAPDH": "ENSG00000111640", "ACTB": "ENSG00000075624"}
    for symbol, ens in known.items():
        assert to_ensembl[symbol][0] == ens and to_symbol[ens] == symbol
    with gzip.open(data_path("hgnc_ensembl.tsv.gz"), "rt") as f:
        src = pd.read_csv(f, sep="\t", dtype=str)
    assert list(src.columns) == ["symbol", "ensembl"] and len(src) == len(to_ensembl) == 36_596
    counts = pd.Series([e for ids in src.ensembl for e in ids.split(";")]).value_counts()
    assert set(to_symbol) == set(counts.index) - set(counts[counts > 1].index) and (counts > 1).sum() == 350


@pytest.mark.parametrize("form", ["ensembl", "versioned", "symbol_column", "mixed"])
def test_every_identifier_route_gives_the_same_tokens(model, form):
    name, m = model
    gf = name == "geneformer"
    native = [ensembl(g) for g in SYMBOLS] if gf else SYMBOLS
    base, _ = tokens(m.prepare(adata_with(native)))
    other_kind = SYMBOLS if gf else [ensembl(g) for g in SYMBOLS]
    mapped = "symbol->Ensembl" if gf else "Ensembl->symbol"
    if form == "ensembl":  # the other kind of identifier in var_names
        adata, routes = adata_with(other_kind), {f"var_names {mapped}": 6}
    elif form == "versioned":
        adata = adata_with([ensembl(g) + ".10" for g in SYMBOLS])
        routes = {"var_names (version dropped)": 6} if gf else {"var_names Ensembl->symbol": 6}
    elif form == "symbol_column":
        adata = adata_with([f"x{i}" for i in range(6)], {"feature_name": SYMBOLS})
        routes = {f"var['feature_name'] {mapped}": 6} if gf else {"var['feature_name']": 6}
    else:  # half native, half the other kind
        adata = adata_with([a if i % 2 else b for i, (a, b) in enumerate(zip(native, other_kind))])
        routes = {"var_names": 3, f"var_names {mapped}": 3}
    prepared = m.prepare(adata)
    assert prepared.alignment.routes == routes
    assert "matched via var" in prepared.alignment.summary()
    got, _ = tokens(prepared)
    assert got.keys() == base.keys() and all(torch.equal(got[k], base[k]) for k in base)


def test_cells_without_counts_are_refused_or_dropped(model):
    name, m = model
    adata = adata_with([ensembl(g) for g in SYMBOLS] if name == "geneformer" else SYMBOLS)
    adata.X = sp.csr_matrix(adata.X.toarray() * (np.arange(4) != 2)[:, None])
    with pytest.raises(UserError, match="cell 'c2' has no counts over .*vocabulary genes.*empty='drop'"):
        m.prepare(adata)
    with pytest.warns(UserWarning, match="dropped 1 of 4 cells with no counts"):
        prepared = m.prepare(adata, empty="drop")
    assert prepared.n_cells == 3 and prepared.alignment.dropped_cells == 1
    _, cells = tokens(prepared)
    assert cells.tolist() == [0, 1, 3]
    out = m(next(iter(prepared)))
    assert torch.isfinite(out.embedding).all() and out.embedding.abs().sum(1).min() > 0


def test_vocabulary_keys_priorities():
    cd3e, cd4 = ensembl("CD3E"), ensembl("CD4")
    adata = adata_with(["CD3E", cd4, "NOPE", "x", "y", "z"],
                       {"gene_ids": [cd3e, "ENSG99999999999", "", "", "", ""],
                        "gene_symbols": ["CD3E", "CD4", "", "LYZ", "", ""]})
    keys, routes = vocabulary_keys(adata, SYMBOLS)
    # the data's own symbols win over the table: CD4's row matches by its symbol column, not its Ensembl id
    assert keys == ["CD3E", "CD4", None, "LYZ", None, None]
    assert routes == {"var_names": 1, "var['gene_symbols']": 2}
    keys, routes = vocabulary_keys(adata, SYMBOLS, gene_key="var_names")  # var_names alone, Ensembl mapped
    assert keys == ["CD3E", "CD4", None, None, None, None]
    assert routes == {"var_names": 1, "var_names Ensembl->symbol": 1}
    keys, routes = vocabulary_keys(adata, SYMBOLS, gene_key="gene_ids")  # one column, as asked
    assert keys == ["CD3E", None, None, None, None, None] and routes == {"var['gene_ids'] Ensembl->symbol": 1}
    with pytest.raises(UserError, match="no column 'symbols'"):
        vocabulary_keys(adata, SYMBOLS, gene_key="symbols")


def test_a_runs_data_gene_key_and_empty_reach_every_stage(tmp_path):
    """[data] gene_key names the var column of genes for every prepare() of the run's model; [data] empty =
    "drop" takes the cells without counts (over the run's gene context) out of the AnnData once, up front."""
    import warnings

    from sae_fast import datasets
    from sae_fast.run import load_config
    from sae_fast.run.config import cells_and_model, model_for

    a = datasets.pbmc3k()[:40].copy()
    a.var = pd.DataFrame({"my_symbols": a.var_names.astype(str)}, index=[f"g{j}" for j in range(a.n_vars)])
    X = a.X.toarray()
    X[[3, 7]] = 0
    a.X = sp.csr_matrix(X)
    path = tmp_path / "cells.h5ad"
    a.write_h5ad(path)
    base = [f'data.path="{path}"', 'model.name="mini"', 'model.context="hvg:64"']
    with pytest.raises(UserError, match="no gene"):
        cells_and_model(load_config(None, base))
    keyed = [*base, 'data.gene_key="my_symbols"']
    context = model_for(load_config(None, keyed), a).genes
    on_context = X[:, [list(a.var["my_symbols"]).index(g) for g in context]].sum(axis=1)
    empty = np.flatnonzero(on_context == 0)  # the two zeroed cells, and any without counts on the 64 genes
    assert {3, 7} <= set(empty.tolist())
    with pytest.raises(UserError, match=f"cell {a.obs_names[empty[0]]!r} \\(and {len(empty) - 1} more\\)"):
        cells_and_model(load_config(None, keyed))
    with pytest.warns(UserWarning, match=f"dropped {len(empty)} of 40 cells"):
        cells, model, alignment = cells_and_model(load_config(None, [*keyed, 'data.empty="drop"']))
    assert list(cells.obs_names) == [c for i, c in enumerate(a.obs_names) if i not in empty]
    assert alignment.dropped_cells == len(empty) and model.genes == context and model.gene_key == "my_symbols"
    with warnings.catch_warnings():  # the run's later passes see no empty cell and need no gene_key=
        warnings.simplefilter("error")
        prepared = model.prepare(cells, batch_size=16)
    assert prepared.n_cells == 40 - len(empty) and prepared.alignment.routes == {"var['my_symbols']": 64}
    with pytest.raises(UserError, match="data.empty = 'skip'; choose one of"):
        load_config(None, [*keyed, 'data.empty="skip"'])
