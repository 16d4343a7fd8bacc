"""One dispatch point for the sparse SAE kernels.

PLACEHOLDER (skeleton): only the plain-torch path exists yet; the triton and cpp backends land with the
ops/kernels work. The signatures below are the contract the rest of the package builds on.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SparseCode(NamedTuple):
    """A sparse code: for each of N rows, k (feature index, activation) pairs. Padding has value 0."""

    indices: torch.Tensor  # [N, k] int64
    values: torch.Tensor  # [N, k] float

    def to_dense(self, n_features: int) -> torch.Tensor:
        out = self.values.new_zeros(self.values.shape[0], n_features)
        return out.scatter_add_(1, self.indices, self.values)


def topk_encode(x, W_enc, b_enc, k: int, relu: bool = True, backend: str = "auto") -> SparseCode:
    """pre = x @ W_enc.T + b_enc; keep the k largest per row (then ReLU if `relu`)."""
    pre = x @ W_enc.T + b_enc
    values, indices = pre.topk(k, dim=1, sorted=False)
    return SparseCode(indices, values.relu() if relu else values)


def sparse_decode(indices, values, W_dec, backend: str = "auto") -> torch.Tensor:
    """x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]]  ->  [N, d]."""
    return torch.einsum("nk,nkd->nd", values, W_dec[indices])
