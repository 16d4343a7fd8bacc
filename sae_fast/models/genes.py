"""Matching an AnnData's genes to a model's vocabulary, and reading its counts a batch of cells at a time.

Genes are taken as users have them: HGNC symbols or Ensembl ids (ENSG00000000003, or versioned
ENSG00000000003.10) in var_names or in a var column (`gene_symbols`, `feature_name`, `gene_name`, ...; Ensembl
in `gene_ids`, `ensembl_id`, ...). A symbol vocabulary (AIDO.Cell, scFoundation, scGPT) takes Ensembl ids through
the bundled HGNC/Ensembl table (sae_fast/data/hgnc_ensembl.tsv.gz), an Ensembl vocabulary (Geneformer) takes
symbols the other way. `GeneAlignment.routes` counts the genes each route matched.

Cells with no counts over the vocabulary genes are refused (the reference models give NaN for them) or, with
`empty="drop"`, dropped with a warning that says how many (`nonempty_rows`)."""

from __future__ import annotations

import gzip
import logging
import re
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import scipy.sparse as sp

from sae_fast.errors import UserError
from sae_fast.models.base import GeneAlignment

log = logging.getLogger(__name__)

ENSEMBL_ID = re.compile(r"^(ENS[A-Z]*G\d{6,})(\.\d+)?$")
SYMBOL_COLUMNS = ("gene_symbols", "feature_name", "gene_name", "gene_symbol", "symbol")
ENSEMBL_COLUMNS = ("gene_ids", "ensembl_id", "gene_id", "feature_id")
EMPTY_CHOICES = ("error", "drop")


@lru_cache(maxsize=1)
def id_table() -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """(Ensembl id -> symbol, symbol -> Ensembl ids) from the bundled table; Ensembl ids that two symbols share
    are left out of the first map."""
    from sae_fast.datasets import data_path

    with gzip.open(data_path("hgnc_ensembl.tsv.gz"), "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    to_ensembl = {s: tuple(e.split(";")) for s, e in rows}
    seen: dict[str, str | None] = {}
    for s, ids in to_ensembl.items():
        for e in ids:
            seen[e] = s if e not in seen else None
    return {e: s for e, s in seen.items() if s is not None}, to_ensembl


def _strip_version(name: str) -> str:
    m = ENSEMBL_ID.match(name)
    return m.group(1) if m else name


def vocabulary_keys(adata, vocab_genes: Sequence[str], *, gene_key: str | None = None
                    ) -> tuple[list[str | None], dict[str, int]]:
    """For each of adata's genes (var order), the vocabulary gene it is (None if none), and the count of genes
    matched by each route ("var_names", "var['feature_name']", "var_names Ensembl->symbol", ...).

    Sources: the var column `gene_key` alone if given (`gene_key="var_names"`: var_names alone); else var_names,
    then the known symbol and Ensembl var columns, in that order. A gene takes the first source whose value is a
    vocabulary gene (after dropping an Ensembl version suffix); failing all, the first that maps to one through
    the HGNC/Ensembl table (Ensembl -> symbol for a symbol vocabulary, symbol -> Ensembl for an Ensembl one)."""
    if gene_key == "var_names":  # var_names alone (e.g. to reproduce a symbol-only pipeline exactly)
        sources = [("var_names", [str(g) for g in adata.var_names])]
    elif gene_key is not None:
        if gene_key not in adata.var:
            raise UserError(f"adata.var has no column {gene_key!r}; columns: {', '.join(map(str, adata.var))}")
        sources = [(f"var[{gene_key!r}]", adata.var[gene_key].astype(str).tolist())]
    else:
        sources = [("var_names", [str(g) for g in adata.var_names])]
        sources += [(f"var[{c!r}]", adata.var[c].astype(str).tolist())
                    for c in (*SYMBOL_COLUMNS, *ENSEMBL_COLUMNS) if c in adata.var]
    vocab = set(vocab_genes)
    sample = list(vocab_genes)[:: max(1, len(vocab_genes) // 200)]
    ensembl_vocab = sum(bool(ENSEMBL_ID.match(g)) for g in sample) > len(sample) / 2
    to_symbol, to_ensembl = id_table()
    keys: list[str | None] = [None] * adata.n_vars
    routes: dict[str, int] = {}
    for mapped in (False, True):  # the data's own identifiers first, then the HGNC/Ensembl table
        for j in range(adata.n_vars):
            if keys[j] is not None:
                continue
            for source, values in sources:
                name = _strip_version(values[j])
                if not mapped:
                    hit = name if name in vocab else None
                    route = source if name == values[j] else f"{source} (version dropped)"
                elif not ensembl_vocab and ENSEMBL_ID.match(name):
                    hit, route = to_symbol.get(name), f"{source} Ensembl->symbol"
                    hit = hit if hit in vocab else None
                elif ensembl_vocab and not ENSEMBL_ID.match(name):
                    hit = next((e for e in to_ensembl.get(name, ()) if e in vocab), None)
                    route = f"{source} symbol->Ensembl"
                else:
                    hit = None
                if hit is not None:
                    keys[j] = hit
                    routes[route] = routes.get(route, 0) + 1
                    break
    return keys, routes


def match_genes(adata, vocab_genes: Sequence[str], *, gene_key: str | None, layer: str | None, model: str,
                no_overlap: str, empty: str = "error") -> tuple[sp.csr_matrix, np.ndarray, GeneAlignment, np.ndarray]:
    """Check `gene_key` and `layer`, map adata's genes onto the vocabulary (`vocabulary_keys`, then
    `gene_projection`) and find the cells to keep (`nonempty_rows`): returns (P, matched, alignment, rows).
    `no_overlap` is the error message when no gene matches."""
    if layer is not None and layer not in adata.layers:
        raise UserError(f"adata.layers has no {layer!r}; layers: {', '.join(adata.layers) or 'none'}")
    keys, routes = vocabulary_keys(adata, vocab_genes, gene_key=gene_key)
    names = adata.var[gene_key].astype(str).tolist() if gene_key not in (None, "var_names") \
        else adata.var_names.tolist()
    P, matched, alignment = gene_projection(keys, vocab_genes, names=names)
    alignment.routes = routes
    if len(matched) == 0:
        raise UserError(no_overlap)
    X = adata.layers[layer] if layer is not None else adata.X
    rows = nonempty_rows(adata, X, np.flatnonzero(P.getnnz(axis=1)), empty=empty, model=model)
    alignment.dropped_cells = adata.n_obs - len(rows)
    log.info("%s: %s", model, alignment.summary())
    return P, matched, alignment, rows


def gene_projection(data_genes: Sequence[str | None], vocab_genes: Sequence[str], *,
                    names: Sequence[str] | None = None) -> tuple[sp.csr_matrix, np.ndarray, GeneAlignment]:
    """Map the data's genes (vocabulary names, None for no match) onto a vocabulary: returns (P, matched,
    alignment).

    P [n_data_genes, n_matched] sums the data columns of each matched vocabulary gene (duplicated names are
    added up); `matched` holds the vocabulary index of each column of X @ P. `names` (default: `data_genes`)
    are what the alignment lists as dropped."""
    index = {g: i for i, g in enumerate(vocab_genes)}
    names = [str(g) for g in (data_genes if names is None else names)]
    cols = np.array([index.get(g, -1) if g is not None else -1 for g in data_genes], dtype=np.int64)
    rows = np.flatnonzero(cols >= 0)
    matched, col_of = np.unique(cols[rows], return_inverse=True)
    P = sp.csr_matrix((np.ones(len(rows)), (rows, col_of)), shape=(len(data_genes), len(matched)))
    present = set(matched.tolist())
    alignment = GeneAlignment(
        n_vocab=len(vocab_genes),
        matched=[vocab_genes[i] for i in matched],
        missing_from_data=[g for i, g in enumerate(vocab_genes) if i not in present],
        dropped_from_data=[g for g, c in zip(names, cols) if c < 0],
    )
    return P, matched, alignment


def nonempty_rows(adata, X, data_cols: np.ndarray, *, empty: str, model: str, chunk: int = 4096) -> np.ndarray:
    """The rows of X that hold counts on the data columns `data_cols` (those matched to the vocabulary).

    A cell whose counts there are all zero gives NaN in the reference models. `empty="error"` refuses it with a
    UserError naming the cell; `empty="drop"` leaves it out with a warning that says how many cells went."""
    if empty not in EMPTY_CHOICES:
        raise UserError(f"empty = {empty!r}; choose 'error' (refuse cells with no counts over the vocabulary) "
                        "or 'drop' (leave them out, with a warning)")
    cols = np.asarray(data_cols, dtype=np.int64)
    empty_rows = []
    for lo in range(0, X.shape[0], chunk):
        block = X[lo:lo + chunk]
        block = block[:, cols] if sp.issparse(block) else np.asarray(block)[:, cols]
        totals = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
        empty_rows.extend((lo + np.flatnonzero(totals == 0)).tolist())
    rows = np.arange(X.shape[0])
    if not empty_rows:
        return rows
    first = adata.obs_names[empty_rows[0]]
    if empty == "error":
        more = f" (and {len(empty_rows) - 1} more)" if len(empty_rows) > 1 else ""
        raise UserError(f"cell {first!r}{more} has no counts over {model}'s vocabulary genes, which the reference "
                        "model turns into NaN: remove it (e.g. sc.pp.filter_cells(adata, min_counts=1) after "
                        "subsetting to the vocabulary) or pass empty='drop' ([data] empty = \"drop\" in a run)")
    warnings.warn(f"{model}: dropped {len(empty_rows)} of {X.shape[0]} cells with no counts over the vocabulary "
                  f"genes (first: {first!r})", UserWarning, stacklevel=4)
    return np.setdiff1d(rows, empty_rows)


def count_rows(adata, rows: np.ndarray, P: sp.csr_matrix, *, layer: str | None, model: str,
               integer: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Dense [B, n_matched] values of cells `rows` on the matched genes, and each cell's total over all genes.

    Only these rows are densified. Negative or non-finite values (and non-integers where `integer`) raise a
    UserError naming the cell, the gene and the fix."""
    X = adata.layers[layer] if layer is not None else adata.X
    Xb = X[rows]
    Xb = sp.csr_matrix(Xb) if not sp.issparse(Xb) else Xb.tocsr()
    data = Xb.data
    bad = ~np.isfinite(data) | (data < 0)
    if integer:
        bad |= data != np.round(data)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        r = int(np.searchsorted(Xb.indptr, k, side="right") - 1)
        where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
        need = "raw counts (non-negative integers)" if integer else "non-negative, finite expression values"
        raise UserError(f"{where} holds {float(data[k])!r} at cell {adata.obs_names[rows[r]]!r}, gene "
                        f"{adata.var_names[Xb.indices[k]]!r}; {model} expects {need}: pass "
                        "adata.raw.to_adata() or choose another layer=")
    totals = np.asarray(Xb.sum(axis=1), dtype=np.float64).ravel()
    return np.asarray((Xb @ P).todense(), dtype=np.float64), totals


__all__ = ["context_genes", "count_rows", "gene_projection", "id_table", "match_genes", "nonempty_rows",
           "parse_context", "vocabulary_keys"]


def context_genes(model, adata, spec: str, *, gene_key: str | None = None) -> list[str] | None:
    """The genes that `spec` ([model] context: all, hvg:N or a file of gene names) names, in vocabulary
    order; None for "all". hvg:N ranks the genes as scanpy's seurat flavour does, on log1p-CP10k of `adata`."""
    from pathlib import Path

    if spec == "all":
        return None
    if spec.startswith("hvg:"):
        n = parse_context(spec)
        import anndata as ad
        import scanpy as sc

        keys, _ = vocabulary_keys(adata, model.genes, gene_key=gene_key)
        cols = {}
        for j, key in enumerate(keys):
            if key is not None:
                cols.setdefault(key, j)
        if not cols:
            raise UserError(f"context = {spec!r}: no gene of the data matches {model.name}'s vocabulary; name the "
                            "adata.var column of gene symbols or Ensembl ids with gene_key ([data] gene_key)")
        if len(cols) < n:
            raise UserError(f"context = {spec!r}: the data measures only {len(cols)} of {model.name}'s "
                            f"{len(model.genes)} genes; ask for at most hvg:{len(cols)}")
        names = list(cols)
        X = adata.X[:, list(cols.values())]
        sub = ad.AnnData(X.astype(np.float32) if sp.issparse(X) else np.asarray(X, np.float32))
        sub.var_names = names
        sc.pp.normalize_total(sub, target_sum=1e4)
        sc.pp.log1p(sub)
        hvg = sc.pp.highly_variable_genes(sub, flavor="seurat", n_top_genes=n, inplace=False)
        chosen = set(np.asarray(names)[hvg["highly_variable"].to_numpy()])
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"context = {spec!r}: not 'all', 'hvg:N' or an existing file of gene names")
        chosen = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        unknown = sorted(chosen - set(model.genes))
        if unknown:
            raise UserError(f"{path}: gene(s) {', '.join(unknown[:5])} not in {model.name}'s vocabulary")
    return [g for g in model.genes if g in chosen]


def parse_context(spec: str) -> int | None:
    """The N of "hvg:N" (None for "all" or a file), or a UserError for a malformed "hvg:" spec."""
    if not spec.startswith("hvg:"):
        return None
    n = spec[4:]
    if not n.isdigit() or int(n) < 1:
        raise UserError(f"context = {spec!r}: write hvg:N with N a positive integer, e.g. hvg:1024")
    return int(n)
