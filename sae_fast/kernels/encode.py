"""Encoder kernels: pre = x @ W.T + b computed tile by tile, optionally fused with a running top-k per row.

`topk(x, W, b, k)` never writes the [N, F] pre-activations: each program owns BLOCK_N rows and a slice of the
features, computes one [BLOCK_N, BLOCK_F] tile at a time (a K-loop of tl.dot over d), and merges the tile into
a running top-k held in registers ([BLOCK_N, KP] values + indices, KP = k rounded up to a power of two, the
surplus slots pinned at +inf so they are never the minimum). The merge repeatedly moves each row's best tile
value into the slot of its current minimum while it beats that minimum; after the first tiles only a handful
of values per tile qualify, so the merge costs little next to the GEMM. Feature slices (`splits`) give the GPU
enough programs; their k candidates per row are merged by one torch.topk over [N, splits * k].

Running top-k in registers only pays for small k: above FUSED_MAX_K, `topk` computes pre tiles with the plain
GEMM kernel over row chunks and selects with torch.topk (sae_fast.ops does this).

fp32 products use input_precision="ieee" (exact fp32, as the tests demand); TF32 would be faster on the GPU
but has ~1e-3 relative error. x may have any row stride (a view is read in place); other inputs are made
contiguous; fp64 inputs are not handled here (ops falls back to torch). Row and feature numbers are int64
before they are multiplied by a row length: N * d, F * d and N * F pass 2^31 elements at realistic sizes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FUSED_MAX_K = 64
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The CPU interpreter runs each program in Python: fewer, larger tiles are faster there.
BLOCK_N, BLOCK_F, BLOCK_D = (256, 512, 128) if INTERPRET else (64, 128, 32)


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def block_range(pid, BLOCK: tl.constexpr):
    """Indices pid * BLOCK + [0, BLOCK) as int64, so that products with a row length cannot wrap at 2^31."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def _pre_tile(x_ptr, w_ptr, b_ptr, rows, feats, N, F, D, stride_x,
              BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One [BLOCK_N, BLOCK_F] tile of x @ W.T + b (fp32), zeros outside the matrix; rows and feats are int64."""
    acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        xt = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=(rows[:, None] < N) & (dd[None, :] < D),
                     other=0.0)
        wt = tl.load(w_ptr + feats[None, :] * D + dd[:, None], mask=(feats[None, :] < F) & (dd[:, None] < D),
                     other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    bias = tl.load(b_ptr + feats, mask=feats < F, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, F, D, stride_x,
                   BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    rows = block_range(tl.program_id(0), BLOCK_N)
    feats = block_range(tl.program_id(1), BLOCK_F)
    pre = _pre_tile(x_ptr, w_ptr, b_ptr, rows, feats, N, F, D, stride_x, BLOCK_N, BLOCK_F, BLOCK_D, PRECISION)
    tl.store(out_ptr + rows[:, None] * F + feats[None, :], pre.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (feats[None, :] < F))


@triton.jit
def _topk_kernel(x_ptr, w_ptr, b_ptr, val_ptr, idx_ptr, N, F, D, stride_x, K, F_PER_SPLIT,
                 KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = block_range(tl.program_id(0), BLOCK_N)
    slots = tl.arange(0, KP)
    lanes = tl.arange(0, BLOCK_F).to(tl.int64)
    top_v = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_N, KP), tl.float32)
    top_i = tl.zeros((BLOCK_N, KP), tl.int32)  # int32 in registers, int64 in memory
    f_lo = split * F_PER_SPLIT
    f_hi = tl.minimum(f_lo + F_PER_SPLIT, F)
    for f0 in range(f_lo, f_hi, BLOCK_F):
        feats = f0 + lanes
        pre = _pre_tile(x_ptr, w_ptr, b_ptr, rows, feats, N, F, D, stride_x, BLOCK_N, BLOCK_F, BLOCK_D,
                        PRECISION)
        pre = tl.where((rows[:, None] < N) & (feats[None, :] < f_hi), pre, float("-inf"))
        best = tl.max(pre, axis=1)
        low = tl.min(top_v, axis=1)
        while tl.max((best > low).to(tl.int32), axis=0) > 0:
            take = best > low
            col = tl.argmax(pre, axis=1)
            slot = tl.argmin(top_v, axis=1)
            put = take[:, None] & (slots[None, :] == slot[:, None])
            top_v = tl.where(put, best[:, None], top_v)
            top_i = tl.where(put, (f0 + col)[:, None], top_i)
            pre = tl.where(take[:, None] & (lanes[None, :] == col[:, None]), float("-inf"), pre)
            best = tl.max(pre, axis=1)
            low = tl.min(top_v, axis=1)
    out = rows[:, None] * (n_splits * K) + split * K + slots[None, :]
    mask = (rows[:, None] < N) & (slots[None, :] < K)
    tl.store(val_ptr + out, top_v.to(val_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + out, top_i.to(tl.int64), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x itself if its rows are unit-stride (any row stride is read in place), else a contiguous copy."""
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ W.T + b as one Triton tile GEMM -> [N, F]."""
    x, W, b = _rows(x), W.contiguous(), b.contiguous()
    (N, D), F = x.shape, W.shape[0]
    out = x.new_empty(N, F)
    if N == 0:
        return out
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(F, BLOCK_F))
    _linear_kernel[grid](x, W, b, out, N, F, D, x.stride(0), BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F, BLOCK_D=BLOCK_D,
                         PRECISION=_precision(x.dtype))
    return out


def _default_splits(n_row_blocks: int, F: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, n_row_blocks), triton.cdiv(F, 4 * BLOCK_F)))


def topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, splits: int | None = None):
    """(values, indices) of the k largest entries per row of x @ W.T + b, unordered; needs k <= FUSED_MAX_K.

    `splits` feature slices run as separate programs (default: enough to fill the GPU; 1 in the
    interpreter)."""
    if k > FUSED_MAX_K:
        raise ValueError(f"fused top-k supports k <= {FUSED_MAX_K}; got {k}")
    x, W, b = _rows(x), W.contiguous(), b.contiguous()
    (N, D), F = x.shape, W.shape[0]
    if N == 0:
        return x.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=x.device)
    n_blocks = triton.cdiv(N, BLOCK_N)
    splits = splits or _default_splits(n_blocks, F, x.device)
    # Every slice but the last gets a whole number of tiles and at least k features.
    per_split = max(triton.cdiv(triton.cdiv(F, splits), BLOCK_F) * BLOCK_F, triton.cdiv(k, BLOCK_F) * BLOCK_F)
    splits = triton.cdiv(F, per_split)
    values = x.new_empty(N, splits * k)
    indices = torch.empty(N, splits * k, dtype=torch.long, device=x.device)
    _topk_kernel[(n_blocks, splits)](x, W, b, values, indices, N, F, D, x.stride(0), k, per_split,
                                     KP=max(2, triton.next_power_of_2(k)), BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F,
                                     BLOCK_D=BLOCK_D, PRECISION=_precision(x.dtype))
    if splits == 1:
        return values, indices
    values, pick = values.topk(k, dim=1, sorted=False)
    return values, indices.gather(1, pick)
