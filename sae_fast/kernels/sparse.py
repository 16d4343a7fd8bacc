"""Sparse kernels: the three pieces every SAE op's sparse half is built from (see sae_fast.ops).

gather_combine(idx[N,k], w[N,k], M[F,d])          out[n] = sum_j w[n,j] M[idx[n,j]]            decode forward,
                                                                                              encoder dx
pair_dot(idx[N,k], G[N,d], M[F,d])                 out[n,j] = <G[n], M[idx[n,j]]>               decode dvalues
segment_reduce(order, offsets, w[N,k], X[N,d])     out[f] = sum_{q in pairs of f} w[q] X[q//k]  dW_dec, dW_enc
                                                   (+ sums[f] = sum w[q], the encoder's db)

segment_reduce reads the pairs grouped by feature (a reverse index: `order` sorted by feature, CSR `offsets`);
a program owns a block of features x a block of columns and walks their segments: each output row has a single
writer, so no atomics and the result is deterministic. Accumulation is in fp32; inputs are made contiguous,
except G, which may have any row stride. Row and feature numbers are int64 before they are multiplied by a row
length (N * k, N * d and F * d pass 2^31 elements at realistic sizes); feature indices and pair numbers are
loaded as int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sae_fast.kernels.encode import block_range

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The CPU interpreter pays per program and per op, not per element: it gets few, large blocks (each clamped to
# the problem's size below, so tiny problems do not pay for huge masked blocks).
BLOCK_N = 512 if INTERPRET else 32  # rows per program (gather_combine, pair_dot)
BLOCK_K = 16 if INTERPRET else 4  # slots per step (gather_combine) or per program (pair_dot)
BLOCK_D = 128 if INTERPRET else 64  # columns of d per step or program
BLOCK_FEAT = 64 if INTERPRET else 4  # features per program in segment_reduce ...
BLOCK_P = 16  # ... and pairs of each feature per step


def _fit(block: int, size: int) -> int:
    return max(1, min(block, triton.next_power_of_2(max(1, size))))


@triton.jit
def _gather_combine_kernel(idx_ptr, w_ptr, m_ptr, out_ptr, N, K, D,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = block_range(tl.program_id(0), BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, K, BLOCK_K):
        slots = j0 + tl.arange(0, BLOCK_K)
        pair_ok = row_ok[:, None] & (slots[None, :] < K)
        f = tl.load(idx_ptr + rows[:, None] * K + slots[None, :], mask=pair_ok, other=0)
        a = tl.load(w_ptr + rows[:, None] * K + slots[None, :], mask=pair_ok, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + f[:, :, None] * D + cols[None, None, :],
                    mask=pair_ok[:, :, None] & col_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a[:, :, None] * m, axis=1)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _pair_dot_kernel(idx_ptr, g_ptr, m_ptr, out_ptr, N, K, D, stride_g,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = block_range(tl.program_id(0), BLOCK_N)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    pair_ok = (rows[:, None] < N) & (slots[None, :] < K)
    f = tl.load(idx_ptr + rows[:, None] * K + slots[None, :], mask=pair_ok, other=0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=(rows[:, None] < N) & col_ok[None, :],
                    other=0.0).to(tl.float32)
        m = tl.load(m_ptr + f[:, :, None] * D + cols[None, None, :],
                    mask=pair_ok[:, :, None] & col_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(g[:, None, :] * m, axis=2)
    tl.store(out_ptr + rows[:, None] * K + slots[None, :], acc.to(out_ptr.dtype.element_ty), mask=pair_ok)


@triton.jit
def _segment_reduce_kernel(order_ptr, offsets_ptr, w_ptr, x_ptr, out_ptr, sums_ptr, F, K, D,
                           WITH_SUM: tl.constexpr, BLOCK_FEAT: tl.constexpr, BLOCK_P: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    # A block of features walks its segments in lockstep, BLOCK_P pairs of every feature per step, until the
    # longest segment of the block is done (a [BLOCK_FEAT, BLOCK_P, BLOCK_D] gather per step).
    feats = block_range(tl.program_id(0), BLOCK_FEAT)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ranks = tl.arange(0, BLOCK_P)
    feat_ok = feats < F
    col_ok = cols < D
    start = tl.load(offsets_ptr + feats, mask=feat_ok, other=0)
    count = tl.load(offsets_ptr + feats + 1, mask=feat_ok, other=0) - start
    acc = tl.zeros((BLOCK_FEAT, BLOCK_D), dtype=tl.float32)
    total = tl.zeros((BLOCK_FEAT, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, tl.max(count, axis=0), BLOCK_P):
        r = r0 + ranks
        ok = r[None, :] < count[:, None]
        q = tl.load(order_ptr + start[:, None] + r[None, :], mask=ok, other=0)
        a = tl.load(w_ptr + q, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + (q // K)[:, :, None] * D + cols[None, None, :],
                    mask=ok[:, :, None] & col_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a[:, :, None] * x, axis=1)
        total += a
    tl.store(out_ptr + feats[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=feat_ok[:, None] & col_ok[None, :])
    if WITH_SUM:
        if tl.program_id(1) == 0:
            tl.store(sums_ptr + feats, tl.sum(total, axis=1).to(sums_ptr.dtype.element_ty), mask=feat_ok)


def gather_combine(idx: torch.Tensor, w: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    idx, w, M = idx.contiguous(), w.contiguous(), M.contiguous()
    (N, K), D = idx.shape, M.shape[1]
    out = w.new_empty(N, D)
    if N == 0:
        return out
    if K == 0:
        return out.zero_()
    bn, bk, bd = _fit(BLOCK_N, N), _fit(BLOCK_K, K), _fit(BLOCK_D, D)
    _gather_combine_kernel[(triton.cdiv(N, bn), triton.cdiv(D, bd))](idx, w, M, out, N, K, D, BLOCK_N=bn,
                                                                       BLOCK_K=bk, BLOCK_D=bd)
    return out


def pair_dot(idx: torch.Tensor, G: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    idx, M = idx.contiguous(), M.contiguous()
    G = G if G.stride(1) == 1 or G.shape[1] <= 1 else G.contiguous()
    (N, K), D = idx.shape, M.shape[1]
    out = G.new_empty(N, K)
    if N == 0 or K == 0:
        return out
    bn, bk, bd = _fit(BLOCK_N, N), _fit(BLOCK_K, K), _fit(BLOCK_D, D)
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    _pair_dot_kernel[grid](idx, G, M, out, N, K, D, G.stride(0), BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd)
    return out


def segment_reduce(order: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, X: torch.Tensor,
                   with_sum: bool = False):
    w, X = w.contiguous(), X.contiguous()
    F, K, D = offsets.numel() - 1, max(1, w.shape[1]), X.shape[1]
    out = X.new_empty(F, D)
    sums = X.new_empty(F if with_sum else 1)
    if F == 0:
        return out, (sums if with_sum else None)
    bf, bp, bd = _fit(BLOCK_FEAT, F), _fit(BLOCK_P, K * X.shape[0] // F + 1), _fit(BLOCK_D, D)
    _segment_reduce_kernel[(triton.cdiv(F, bf), triton.cdiv(D, bd))](
        order, offsets, w, X, out, sums, F, K, D, WITH_SUM=with_sum, BLOCK_FEAT=bf, BLOCK_P=bp, BLOCK_D=bd)
    return out, (sums if with_sum else None)
