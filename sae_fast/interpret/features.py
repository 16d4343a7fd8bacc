"""The feature x gene matrix F, gene filters, the participation ratio and top-gene selection (SPEC §2, [Y]).

    acc = FeatureGeneAccumulator(n_features, n_genes, n_cells)
    for code, gene_ids, cell_ids in stream:   # from the fused forward, from shards, or from tensors
        acc.add(code, gene_ids, cell_ids)
    F, cell_max, cell_mean, pairs = acc.result()

F[i, g] is the mean over cells of feature i's activation at gene g's token: the sum over tokens of gene g
divided by how many cells have a token for g (every cell for AIDO.Cell, which sees all genes; only the
expressing cells for scGPT/Geneformer). Per cell, the accumulator also max- and mean-pools every feature over
the cell's gene tokens (the AnnData obsm["X_sae_max"] / ["X_sae_mean"]). Memory is F x n_genes
+ 2 x n_cells x F, whatever the data size.
"""

from __future__ import annotations

from typing import NamedTuple

import numba as nb
import numpy as np
import torch

from sae_fast.errors import UserError
from sae_fast.ops import SparseCode


class FeatureGeneResult(NamedTuple):
    F: np.ndarray  # [n_features, n_genes] mean activation per gene over the cells holding that gene
    cell_max: np.ndarray  # [n_cells, n_features] max over each cell's gene tokens
    cell_mean: np.ndarray  # [n_cells, n_features] mean over each cell's gene tokens
    gene_counts: np.ndarray  # [n_genes] tokens seen per gene (cells holding the gene)
    # (feature, activation, expression) at active tokens
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None


class FeatureGeneAccumulator:
    """Streaming accumulator of F and per-cell pooled activations from sparse codes.

    `add(code, gene_ids, cell_ids, expression=None)` takes one flat batch of N tokens: `code` a SparseCode
    [N, k] (padding entries have value 0; a dense [N, n_features] tensor is accepted too, as for raw neurons),
    `gene_ids` [N] (index into the gene axis; -1 = not a gene, skipped), `cell_ids` [N] (row of the cell).
    With `expression` [N] given, up to `max_pairs` (feature, activation, expression) triples at active
    positions are kept (a uniform random subset beyond that) for the expression-level Spearman test.
    """

    def __init__(self, n_features: int, n_genes: int, n_cells: int, *, max_pairs: int = 2_000_000,
                 seed: int = 0):
        self.n_features, self.n_genes, self.n_cells = n_features, n_genes, n_cells
        self.sum = np.zeros(n_genes * n_features)  # gene-major [G, F], float64
        self.gene_counts = np.zeros(n_genes)
        self.cell_max = np.full(n_cells * n_features, -np.inf, np.float32)
        self.cell_sum = np.zeros(n_cells * n_features)
        self.cell_tokens = np.zeros(n_cells)
        self.sparse = False
        self.max_pairs = max_pairs
        self._pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._rng = np.random.default_rng(seed)

    def add(self, code, gene_ids, cell_ids, expression=None) -> None:
        dense = isinstance(code, torch.Tensor)  # dense activations: every feature at every token
        if dense and (code.ndim != 2 or code.shape[1] != self.n_features):
            raise UserError(f"dense activations of shape {tuple(code.shape)} do not match "
                            f"n_features={self.n_features}")
        if not dense:
            self.sparse = self.sparse or code.indices.shape[1] < self.n_features
        gene_ids = torch.as_tensor(gene_ids).reshape(-1).long().cpu()
        cell_ids = torch.as_tensor(cell_ids).reshape(-1).long().cpu()
        keep = gene_ids >= 0
        if not bool(keep.all()):
            gene_ids, cell_ids = gene_ids[keep], cell_ids[keep]
            code = code[keep] if dense else SparseCode(code.indices[keep], code.values[keep])
            if expression is not None:
                expression = torch.as_tensor(expression).reshape(-1)[keep]
        if gene_ids.numel() == 0:
            return
        if (int(gene_ids.max()) >= self.n_genes or int(cell_ids.max()) >= self.n_cells
                or int(cell_ids.min()) < 0):
            raise UserError(f"gene id {int(gene_ids.max())} / cell id {int(cell_ids.max())} out of range for "
                            f"{self.n_genes} genes and {self.n_cells} cells")
        genes, cells = gene_ids.numpy(), cell_ids.numpy()
        self.gene_counts += np.bincount(genes, minlength=self.n_genes)
        self.cell_tokens += np.bincount(cells, minlength=self.n_cells)
        if dense:
            val = code.detach().float().cpu().contiguous().numpy()
            _scatter_dense(val, genes, cells, self.sum, self.cell_sum, self.cell_max)
            return
        ind = code.indices.long().cpu()
        val = code.values.detach().float().cpu()
        k = ind.shape[1]
        _scatter_sparse(ind.contiguous().numpy(), val.contiguous().numpy(), genes, cells, self.n_features,
                        self.sum, self.cell_sum, self.cell_max)
        if expression is not None and self.max_pairs > 0:
            expr = torch.as_tensor(expression).reshape(-1).float().cpu()
            active = (val != 0).reshape(-1).numpy()
            f = ind.reshape(-1).numpy()[active]
            a = val.reshape(-1).numpy()[active]
            e = expr[:, None].expand(-1, k).reshape(-1).numpy()[active]
            self._pairs.append((f.astype(np.int32), a.astype(np.float32), e.astype(np.float32)))
            self._shrink()

    def _shrink(self) -> None:
        """Keep a uniform random subset of at most max_pairs triples (random keys, keep the smallest)."""
        n = sum(p[0].size for p in self._pairs)
        if n <= 2 * self.max_pairs:
            return
        f, a, e = (np.concatenate(x) for x in zip(*self._pairs))
        keep = self._rng.permutation(f.size)[: self.max_pairs]
        keep.sort()
        self._pairs = [(f[keep], a[keep], e[keep])]

    def result(self) -> FeatureGeneResult:
        F = self.sum.reshape(self.n_genes, self.n_features).T / np.maximum(self.gene_counts, 1)
        cmax = self.cell_max.reshape(self.n_cells, self.n_features)
        cmax = np.where(np.isinf(cmax), np.float32(0), cmax)
        if self.sparse:  # a feature absent from a token's top-k has value 0 there
            cmax = np.maximum(cmax, np.float32(0))
        cmean = self.cell_sum.reshape(self.n_cells, self.n_features)
        cmean = cmean / np.maximum(self.cell_tokens, 1)[:, None]
        pairs = None
        if self._pairs:
            f, a, e = (np.concatenate(x) for x in zip(*self._pairs))
            if f.size > self.max_pairs:
                keep = np.sort(self._rng.permutation(f.size)[: self.max_pairs])
                f, a, e = f[keep], a[keep], e[keep]
            pairs = (f, a, e)
        return FeatureGeneResult(F, cmax, cmean.astype(np.float32), self.gene_counts.copy(), pairs)


@nb.njit(cache=True)
def _scatter_sparse(ind, val, genes, cells, n_features, gsum, csum, cmax):
    """One pass over the (token, slot) pairs: gene sums, cell sums and cell maxima (flat, row-major)."""
    for t in range(ind.shape[0]):
        g = genes[t] * n_features
        c = cells[t] * n_features
        for j in range(ind.shape[1]):
            f = ind[t, j]
            v = val[t, j]
            gsum[g + f] += v
            csum[c + f] += v
            if v > cmax[c + f]:
                cmax[c + f] = v


@nb.njit(cache=True)
def _scatter_dense(val, genes, cells, gsum, csum, cmax):
    n_features = val.shape[1]
    for t in range(val.shape[0]):
        g = genes[t] * n_features
        c = cells[t] * n_features
        for f in range(n_features):
            v = val[t, f]
            gsum[g + f] += v
            csum[c + f] += v
            if v > cmax[c + f]:
                cmax[c + f] = v


@nb.njit(parallel=True, cache=True)
def _pr_rows(F):
    out = np.zeros(F.shape[0])
    for i in nb.prange(F.shape[0]):
        s2 = 0.0
        s4 = 0.0
        for g in range(F.shape[1]):
            v = F[i, g] * F[i, g]
            s2 += v
            s4 += v * v
        out[i] = s2 * s2 / s4 if s4 > 0 else 0.0
    return out


def participation_ratio(F) -> np.ndarray:
    """PR_i = (sum_g F_ig^2)^2 / sum_g F_ig^4 per row (feature): how many genes it effectively spreads over.

    1 for a one-gene feature, n for n equal genes; 0 for an all-zero row. Accumulated in float64 (numba)."""
    F = np.ascontiguousarray(np.asarray(F, np.float64))
    if F.ndim != 2:
        raise UserError(f"participation_ratio needs a 2-D features x genes matrix, got shape {F.shape}")
    return _pr_rows(F)


def n_top_genes(pr, rule: str = "paper", s: float = 0.6, clip: tuple[int, int] = (10, 100)) -> np.ndarray:
    """How many top genes each feature is tested with: [Y]'s paper rule round(PR), or its code's
    clip(int(PR * s), lo, hi) (s = 0.6 or 1.0, clip 10..100)."""
    pr = np.asarray(pr, np.float64)
    if rule == "paper":
        return np.rint(pr).astype(np.int64)
    if rule == "code":
        return np.clip((pr * s).astype(np.int64), clip[0], clip[1])
    raise UserError(f"top-gene rule {rule!r} unknown; choose 'paper' (round(PR)) or 'code' (clip(int(PR*s)))")


def top_genes(F, n_top) -> list[np.ndarray]:
    """Per feature, the column indices of its n_top largest entries (positive ones only), largest first."""
    F = np.asarray(F)
    out = []
    for i, n in enumerate(np.broadcast_to(np.asarray(n_top), (F.shape[0],))):
        row = F[i]
        n = int(min(n, row.size))
        if n <= 0:
            out.append(np.zeros(0, np.int64))
            continue
        idx = np.argpartition(-row, n - 1)[:n]
        idx = idx[np.argsort(-row[idx], kind="stable")]
        out.append(idx[row[idx] > 0])
    return out


def gene_filter(adata, rule: str = "paper", layer: str | None = None) -> np.ndarray:
    """Boolean mask over adata.var of the genes kept (the enrichment background), from raw counts.

    paper ([Y]): drop genes that are zero in more than 50% of cells or whose mean log1p(CPM) < 0.01.
    code ([Y]'s code): keep genes with mean raw count > 0.01 or non-zero in more than 0.5% of cells.
    none: keep every gene."""
    import scipy.sparse as sp

    if rule == "none":
        return np.ones(adata.n_vars, bool)
    if rule not in ("paper", "code"):
        raise UserError(f"gene filter {rule!r} unknown; choose 'paper', 'code' or 'none'")
    X = adata.layers[layer] if layer else adata.X
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)  # never share index arrays with adata.X: sorting them
    # (X != 0 sorts a non-canonical matrix in place) would scramble the caller's counts
    n = X.shape[0]
    nonzero_frac = np.asarray((X != 0).sum(0)).ravel() / n
    if rule == "code":
        return (np.asarray(X.mean(0)).ravel() > 0.01) | (nonzero_frac > 0.005)
    totals = np.asarray(X.sum(1)).ravel()
    cpm = sp.diags(1e6 / np.where(totals > 0, totals, 1)) @ X
    cpm.data = np.log1p(cpm.data)
    mean_log_cpm = np.asarray(cpm.mean(0)).ravel()
    return (nonzero_frac >= 0.5) & (mean_log_cpm >= 0.01)
