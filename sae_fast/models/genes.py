"""Matching an AnnData's genes to a model's vocabulary, and reading its counts a batch of cells at a time.

Shared by the models that tokenise a subset of genes per cell (scGPT by symbol, Geneformer by Ensembl id)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from sae_fast.errors import UserError
from sae_fast.models.base import GeneAlignment

log = logging.getLogger(__name__)


def match_genes(adata, vocab_genes: Sequence[str], *, gene_key: str | None, layer: str | None, model: str,
                no_overlap: str) -> tuple[sp.csr_matrix, np.ndarray, GeneAlignment]:
    """Check `gene_key` and `layer`, then map adata's genes (var_names or the var column `gene_key`) onto the
    vocabulary with `gene_projection`. `no_overlap` is the error message when no gene matches."""
    if gene_key is not None and gene_key not in adata.var:
        raise UserError(f"adata.var has no column {gene_key!r}; columns: {', '.join(map(str, adata.var))}")
    if layer is not None and layer not in adata.layers:
        raise UserError(f"adata.layers has no {layer!r}; layers: {', '.join(adata.layers) or 'none'}")
    names = adata.var[gene_key].astype(str).tolist() if gene_key is not None else adata.var_names.tolist()
    P, matched, alignment = gene_projection(names, vocab_genes)
    if len(matched) == 0:
        raise UserError(no_overlap)
    log.info("%s: %s", model, alignment.summary())
    return P, matched, alignment


def gene_projection(data_genes: Sequence[str], vocab_genes: Sequence[str]
                    ) -> tuple[sp.csr_matrix, np.ndarray, GeneAlignment]:
    """Map the data's genes onto a vocabulary: returns (P, matched, alignment).

    P [n_data_genes, n_matched] sums the data columns of each matched vocabulary gene (duplicated names are
    added up); `matched` holds the vocabulary index of each column of X @ P."""
    index = {g: i for i, g in enumerate(vocab_genes)}
    data_genes = [str(g) for g in data_genes]
    cols = np.array([index.get(g, -1) for g in data_genes], dtype=np.int64)
    rows = np.flatnonzero(cols >= 0)
    matched, col_of = np.unique(cols[rows], return_inverse=True)
    P = sp.csr_matrix((np.ones(len(rows)), (rows, col_of)), shape=(len(data_genes), len(matched)))
    present = set(matched.tolist())
    alignment = GeneAlignment(
        n_vocab=len(vocab_genes),
        matched=[vocab_genes[i] for i in matched],
        missing_from_data=[g for i, g in enumerate(vocab_genes) if i not in present],
        dropped_from_data=[g for g, c in zip(data_genes, cols) if c < 0],
    )
    return P, matched, alignment


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


__all__ = ["count_rows", "gene_projection", "match_genes"]
