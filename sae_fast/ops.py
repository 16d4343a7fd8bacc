"""One dispatch point for the sparse SAE kernels: encode (TopK / BatchTopK / threshold) and sparse decode.

Every op is one `torch.autograd.Function`, shared by all backends; a backend only decides which kernel
computes each of five pieces:

    linear(x, W, b)                 pre-activations of one row chunk, x @ W.T + b      (dense: BLAS / tl.dot)
    topk(x, W, b, k)                top-k of pre per row, never all N x F of pre at once  (chunked or fused)
    gather_combine(idx, w, M)       out[n] = sum_j w[n, j] M[idx[n, j]]                   -> [N, d]
    pair_dot(idx, G, M)             out[n, j] = <G[n], M[idx[n, j]]>                      -> [N, k]
    segment_reduce(rev, w, X, F)    out[f] = sum_{(n, j): idx[n, j] = f} w[n, j] X[n]    -> [F, d] (+ sum w)
    decode_residual(idx, w, M, b, X)  r = gather_combine(idx, w, M) + b - X, D = pair_dot(idx, r, M), plus
                                    sum ||r||^2 and sum_n r[n]; in one pass on the CPU (each row's k rows of M
                                    are read once, and r[n] is summed while in L1)

The sparse algebra is the same four lines for the encoder and the decoder (as in OpenAI sparse_autoencoder's
kernels.py: a sparse-dense product and its transpose):

    decode forward      x_hat  = gather_combine(idx, values, W_dec)
    decode backward     dvalues = pair_dot(idx, g, W_dec);   dW_dec = segment_reduce(rev, values, g)
    encode backward     dx     = gather_combine(idx, g', W_enc); dW_enc, db_enc = segment_reduce(rev, g', x)
                        (g' = dL/dvalues, zero where the ReLU is off or the slot is padding)
    reconstruction MSE  mse = mean_n ||r[n]||^2 with (r, D) = decode_residual(idx, values, W_dec, b_pre, x); its
                        backward needs no pair_dot pass: dvalues = c D, dW_dec = segment_reduce(rev, c values, r),
                        db_pre = c sum_n r[n] (c = 2 dL/dmse / N)

`rev` is a reverse index (pairs sorted by feature, CSR offsets): the weight gradients are a segmented
reduction over each feature's pairs, parallel over features, without atomics (deterministic). Nothing of size
[N, F] or [N, k, d] is ever materialised, except one row chunk of pre-activations at a time.

Backends ("auto" picks per device and logs its choice once; `backend_for(tensor)` says which):
  "triton"  CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, for tests): kernels in sae_fast.kernels.
  "cpp"     CPU: C++/OpenMP kernels from sae_fast.csrc for the sparse pieces, built on first use and cached;
            the dense encoder product, in row chunks, is oneDNN's fp32 linear on CPUs with AVX-512 (a Zen 4
            AMD EPYC, one thread: 293 ms vs 348 ms for MKL's sgemm at N=4096, d=640, F=5120) and BLAS
            (torch.addmm) on the others (a Zen 3 EPYC, AVX2 only: MKL 342 ms vs oneDNN 394 ms). The choice is
            fixed per machine, never timed at run time: a run and its resume take the same path, bit for bit.
  "torch"   plain PyTorch, any device; chunked so it is memory-safe too.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import torch

from sae_fast.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cpp", "torch")
# Rows per chunk are chosen so one chunk of pre-activations holds about this many elements (16 MiB in fp32):
# big enough for an efficient GEMM, small enough to stay in the last-level cache.
CHUNK_ELEMENTS = 1 << 22


class SparseCode(NamedTuple):
    """A sparse code: for each of N rows, k (feature index, activation) pairs. Padding has value 0."""

    indices: torch.Tensor  # [N, k] int64
    values: torch.Tensor  # [N, k] float

    def to_dense(self, n_features: int) -> torch.Tensor:
        out = self.values.new_zeros(self.values.shape[0], n_features)
        return out.scatter_add_(1, self.indices, self.values)


class ReverseIndex(NamedTuple):
    """The (n, j) pairs of an [N, k] index matrix grouped by feature (CSR): the pairs of feature f are
    order[offsets[f]:offsets[f + 1]], each a flat position n * k + j."""

    order: torch.Tensor  # [N*k] int64
    offsets: torch.Tensor  # [F+1] int64

    def pair_features(self) -> torch.Tensor:
        """The feature of each pair of `order` (non-decreasing, [N*k] int64)."""
        n_features = len(self.offsets) - 1
        return torch.repeat_interleave(torch.arange(n_features, device=self.offsets.device), self.offsets.diff())


def reverse_index(indices: torch.Tensor, n_features: int) -> ReverseIndex:
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = flat.new_zeros(n_features + 1)
    offsets[1:] = torch.bincount(flat, minlength=n_features).cumsum(0)
    return ReverseIndex(order, offsets)


def _chunk_rows(n_cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, n_cols))


# ------------------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------------------


class TorchKernels:
    """Plain PyTorch: the fallback on any device and the base the other backends override piece by piece."""

    name = "torch"

    def linear(self, x, W, b):
        return torch.addmm(b, x, W.T)

    def select_topk(self, pre, k):
        return torch.topk(pre, k, dim=1, sorted=False)

    def reverse_index(self, indices, n_features):
        return reverse_index(indices, n_features)

    def topk(self, x, W, b, k):
        N = x.shape[0]
        values = x.new_empty(N, k)
        indices = torch.empty(N, k, dtype=torch.long, device=x.device)
        step = _chunk_rows(W.shape[0])
        for s in range(0, N, step):
            values[s:s + step], indices[s:s + step] = self.select_topk(self.linear(x[s:s + step], W, b), k)
        return values, indices

    def gather_combine(self, idx, w, M):
        # A sparse [N, F] matrix times M (torch sorts and sums duplicate (row, feature) pairs itself).
        N, k = idx.shape
        rows = torch.arange(N, device=idx.device).repeat_interleave(k)
        S = torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), w.reshape(-1), (N, M.shape[0]),
                                    check_invariants=False)
        return torch.sparse.mm(S, M)

    def decode_residual(self, idx, w, M, b, X):
        """(r, D, sq, colsum): r = decode + b - X, D = pair_dot(idx, r, M), sq = sum of r^2, colsum = r.sum(0)."""
        r = self.gather_combine(idx, w, M).add_(b).sub_(X)
        flat = r.reshape(-1)
        return r, self.pair_dot(idx, r, M), torch.dot(flat, flat), r.sum(0)

    def pair_dot(self, idx, G, M):
        N, k = idx.shape
        out = G.new_empty(N, k)
        step = _chunk_rows(k * M.shape[1])
        for s in range(0, N, step):
            e = s + step
            out[s:e] = torch.bmm(M[idx[s:e]], G[s:e, :, None]).squeeze(2)
        return out

    def segment_reduce(self, rev, w, X, n_features, with_sum=False):
        # The transpose: a sparse [F, N] matrix (built from the reverse index) times X.
        k = max(1, w.shape[1])
        feats = rev.pair_features()
        ws = w.reshape(-1)[rev.order]
        S = torch.sparse_coo_tensor(torch.stack([feats, rev.order // k]), ws, (n_features, X.shape[0]),
                                    check_invariants=False)
        out = torch.sparse.mm(S, X)
        return out, (X.new_zeros(n_features).index_add_(0, feats, ws) if with_sum else None)


class CppKernels(TorchKernels):
    """CPU: BLAS for the dense product (inherited); C++/OpenMP (sae_fast.csrc) for top-k and the sparse part.

    The top-k (csrc topk_rows, up to k = SCAN_MAX_K; torch.topk above) filters each row by a lower bound on its
    k-th largest value, the k-th largest of ~5k group maxima (AVX2 for fp32), then picks the k among the few
    candidates left."""

    name = "cpp"

    # Up to this k the C++ group-max filter beats torch.topk; above it torch.topk (a partial sort) wins.
    SCAN_MAX_K = 64

    def __init__(self, ext):
        self.ext = ext
        self.use_onednn = torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability() == "AVX512"

    def linear(self, x, W, b):
        if x.dtype == torch.float32 and self.use_onednn:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), W.contiguous(), b, "none", [], "")
        return super().linear(x, W, b)

    def select_topk(self, pre, k):
        if k > self.SCAN_MAX_K or pre.dtype not in (torch.float32, torch.float64):
            return super().select_topk(pre, k)
        return self.ext.topk_rows(pre, k)

    def reverse_index(self, indices, n_features):
        return ReverseIndex(*self.ext.reverse_index(indices, n_features))

    def gather_combine(self, idx, w, M):
        return self.ext.gather_combine(idx.contiguous(), w.contiguous(), M.contiguous())

    def decode_residual(self, idx, w, M, b, X):
        return tuple(self.ext.decode_residual(idx.contiguous(), w.contiguous(), M.contiguous(), b.contiguous(),
                                              X.contiguous()))

    def pair_dot(self, idx, G, M):
        return self.ext.pair_dot(idx.contiguous(), G.contiguous(), M.contiguous())

    def segment_reduce(self, rev, w, X, n_features, with_sum=False):
        out, sums = self.ext.segment_reduce(rev.order, rev.offsets, w.contiguous(), X.contiguous(), with_sum)
        return out, (sums if with_sum else None)


class TritonKernels(TorchKernels):
    """CUDA (or TRITON_INTERPRET=1 on the CPU): Triton kernels from sae_fast.kernels.

    Top-k is fused into the encoder GEMM up to k = kernels.encode.FUSED_MAX_K; above that the GEMM runs as a
    Triton tile kernel over row chunks and torch.topk selects. Codes with k >= F / DENSE_FROM go through the
    same tile GEMM as dense [N, F] matrices. fp64 (gradcheck) uses the torch kernels."""

    name = "triton"

    def __init__(self):
        from sae_fast.kernels import encode, sparse

        self.encode, self.sparse = encode, sparse

    @staticmethod
    def _native(t):
        return t.dtype != torch.float64

    def linear(self, x, W, b):
        return self.encode.linear(x, W, b) if self._native(x) else super().linear(x, W, b)

    def topk(self, x, W, b, k):
        if k <= self.encode.FUSED_MAX_K and self._native(x):
            return self.encode.topk(x, W, b, k)
        return super().topk(x, W, b, k)

    # From k >= F / DENSE_FROM a code is nearly dense: its [N, F] form costs at most DENSE_FROM x the [N, k] one,
    # and the tile GEMM (tensor cores on a GPU) beats gathering k ~ F rows of M per token.
    DENSE_FROM = 4

    def _dense(self, idx, n_features):
        return idx.numel() > 0 and idx.shape[1] * self.DENSE_FROM >= n_features

    def gather_combine(self, idx, w, M):
        if not self._native(w):
            return super().gather_combine(idx, w, M)
        if self._dense(idx, M.shape[0]):
            code = w.new_zeros(idx.shape[0], M.shape[0]).scatter_add_(1, idx, w)
            return self.encode.linear(code, M.T, w.new_zeros(M.shape[1]))
        return self.sparse.gather_combine(idx, w, M)

    def pair_dot(self, idx, G, M):
        if not self._native(G):
            return super().pair_dot(idx, G, M)
        if self._dense(idx, M.shape[0]):
            return self.encode.linear(G, M, G.new_zeros(M.shape[0])).gather(1, idx)
        return self.sparse.pair_dot(idx, G, M)

    def segment_reduce(self, rev, w, X, n_features, with_sum=False):
        if not self._native(X):
            return super().segment_reduce(rev, w, X, n_features, with_sum)
        if self._dense(w, n_features):
            feats = rev.pair_features()
            code = X.new_zeros(X.shape[0], n_features)
            code.index_put_((rev.order // w.shape[1], feats), w.reshape(-1)[rev.order].to(X.dtype), accumulate=True)
            out = self.encode.linear(code.T, X.T, X.new_zeros(X.shape[1]))
            return out, (code.sum(0) if with_sum else None)
        return self.sparse.segment_reduce(rev.order, rev.offsets, w, X, with_sum)


@functools.cache
def _cpp_kernels():
    """The C++ backend, or None (with one warning saying why) when the extension cannot be built."""
    from sae_fast.csrc import load_extension

    try:
        return CppKernels(load_extension())
    except Exception as e:  # no compiler, missing headers, ...: say so once and fall back
        lines = str(e).strip().splitlines() or [type(e).__name__]
        why = next((line for line in lines if "error" in line.lower()), lines[-1])
        log.warning("sae_fast: C++ kernels unavailable (%s); falling back to the plain torch backend", why)
        return None


@functools.cache
def _triton_kernels():
    return TritonKernels()


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def backend_for(tensor: torch.Tensor, backend: str = "auto") -> str:
    """Which backend `backend` resolves to for `tensor`'s device: cuda -> triton, cpu -> cpp (if the extension
    builds) else torch. An explicit backend that cannot run there raises UserError."""
    if backend not in BACKENDS:
        raise UserError(f"unknown ops backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = tensor.device
    if backend == "auto":
        if device.type == "cuda":
            try:
                import triton  # noqa: F401
                return "triton"
            except ImportError:
                return "torch"
        return "cpp" if device.type == "cpu" and _cpp_kernels() is not None else "torch"
    if backend == "triton" and not _triton_usable(device):
        raise UserError(f"backend 'triton' needs CUDA tensors (got {device}); for CPU tensors use "
                        "backend='cpp' or 'torch' (or set TRITON_INTERPRET=1 before importing triton: slow)")
    if backend == "cpp":
        if device.type != "cpu":
            raise UserError(f"backend 'cpp' runs on CPU tensors only (got {device}); use 'triton' or 'auto'")
        if _cpp_kernels() is None:
            raise UserError("backend 'cpp' is unavailable: the C++ extension did not build (see the warning "
                            "above); install a C++ compiler (g++) or use backend='torch'")
    return backend


@functools.cache
def _log_choice(device: str, name: str) -> None:
    log.info("sae_fast.ops: using the %s backend on %s", name, device)


def _kernels(tensor: torch.Tensor, backend: str) -> TorchKernels:
    name = backend_for(tensor, backend)
    if backend == "auto":
        _log_choice(str(tensor.device), name)
    if name == "triton":
        return _triton_kernels()
    if name == "cpp":
        return _cpp_kernels()
    return TorchKernels()


# ------------------------------------------------------------------------------------------------------------
# Selection: which (row, feature) pairs an encoder keeps. Never differentiated: the values are.
# ------------------------------------------------------------------------------------------------------------


def _select_topk(kern, x, W, b, k, relu):
    pre, idx = kern.topk(x, W, b, k)
    # Finite inputs can still overflow to inf (and inf - inf to NaN) in the product; every backend marks such a
    # row with a non-finite value among its k (torch.topk ranks NaN and inf first; the C++ scan writes NaN for
    # a row holding NaN; the fused Triton merge keeps -inf in slots nothing could fill): one check over [N, k].
    bad = ~torch.isfinite(pre)
    if bool(bad.any()):
        raise UserError(f"topk_encode: the pre-activations of row {_first_bad_row(pre, bad)} overflow (inf or NaN "
                        f"in x @ W_enc.T + b_enc); rescale the inputs or check the weights")
    return idx, pre, None


def _pad_rows(chunks, n_rows, device, dtype):
    """Stack per-chunk (values, indices, count) selections, padding every row to the largest count.

    Each row's `count` kept pairs fill its first slots (in descending order of value); the rest is padding:
    value 0 and index = the slot number j (a valid feature, spreading the zero-weight padding pairs over
    features instead of piling them on feature 0)."""
    width = max([c[0].shape[1] for c in chunks], default=0)
    values = torch.zeros(n_rows, width, dtype=dtype, device=device)
    indices = torch.arange(width, device=device).expand(n_rows, width).clone()
    valid = torch.zeros(n_rows, width, dtype=torch.bool, device=device)
    s = 0
    for v, i, count in chunks:
        e, w = s + v.shape[0], v.shape[1]
        ok = torch.arange(w, device=device) < count[:, None]
        values[s:e, :w] = torch.where(ok, v, 0)
        indices[s:e, :w] = torch.where(ok, i, indices[s:e, :w])
        valid[s:e, :w] = ok
        s = e
    return indices, values, valid


def _select_above(kern, x, W, b, threshold, inclusive=False):
    """Keep every pair with pre > threshold (>= if inclusive); threshold is a scalar or a per-feature [F]."""
    chunks = []
    step = _chunk_rows(W.shape[0])
    for s in range(0, x.shape[0], step):
        pre = kern.linear(x[s:s + step], W, b)
        keep = pre >= threshold if inclusive else pre > threshold
        count = keep.sum(1)
        width = int(count.max()) if count.numel() else 0
        v, i = pre.masked_fill(~keep, float("-inf")).topk(width, dim=1)  # sorted: kept pairs come first
        chunks.append((v, i, count))
    return _pad_rows(chunks, x.shape[0], x.device, x.dtype)


def _select_batch_topk(kern, x, W, b, k, relu):
    """Pass 1: the (k*N)-th largest pre-activation of the whole batch, from a running top-(k*N) over row
    chunks. Pass 2: keep every pair >= that value (and > 0 under ReLU)."""
    budget = k * x.shape[0]
    if budget == 0:
        return _select_above(kern, x, W, b, float("inf"))
    best = x.new_empty(0)
    step = _chunk_rows(W.shape[0])
    for s in range(0, x.shape[0], step):
        cand = torch.cat([best, kern.linear(x[s:s + step], W, b).reshape(-1)])
        best = cand.topk(min(budget, cand.numel()), sorted=False).values
    tau = best.min()
    if relu:
        return _select_above(kern, x, W, b, tau.clamp_min(0), inclusive=bool(tau > 0))
    return _select_above(kern, x, W, b, tau, inclusive=True)


# ------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ------------------------------------------------------------------------------------------------------------


class SparseEncode(torch.autograd.Function):
    """values[n, j] = act(x[n] . W_enc[idx[n, j]] + b_enc[idx[n, j]]) for the pairs `select` keeps.

    The backward touches only those pairs: with g' = dL/dvalues masked by the ReLU and the padding,
    dx = gather_combine(idx, g', W_enc), (dW_enc, db_enc) = segment_reduce(reverse index, g', x)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, kern, select, arg, relu):
        with torch.no_grad():
            idx, pre, valid = select(kern, x, W_enc, b_enc, arg, relu)
            gate = pre > 0 if relu else torch.ones_like(pre, dtype=torch.bool)
            if valid is not None:
                gate &= valid
            values = torch.where(gate, pre, 0) if relu or valid is not None else pre
        ctx.save_for_backward(x, W_enc, idx, gate)
        ctx.kern = kern
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # no [N, k] zeros for idx's (absent) gradient
        return idx, values

    @staticmethod
    def backward(ctx, _gidx, gvalues):
        if gvalues is None:
            return None, None, None, None, None, None, None
        x, W_enc, idx, gate = ctx.saved_tensors
        kern = ctx.kern
        g = torch.where(gate, gvalues, 0)
        dx = dW = db = None
        if ctx.needs_input_grad[0]:
            dx = kern.gather_combine(idx, g, W_enc)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dW, db = kern.segment_reduce(kern.reverse_index(idx, W_enc.shape[0]), g, x, W_enc.shape[0],
                                         with_sum=ctx.needs_input_grad[2])
        return dx, dW, db, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """x_hat[n] = sum_j values[n, j] W_dec[idx[n, j]]; backward: dvalues = pair_dot(idx, g, W_dec),
    dW_dec = segment_reduce(reverse index, values, g)."""

    @staticmethod
    def forward(ctx, indices, values, W_dec, kern):
        ctx.save_for_backward(indices, values, W_dec)
        ctx.kern = kern
        return kern.gather_combine(indices, values, W_dec)

    @staticmethod
    def backward(ctx, g):
        indices, values, W_dec = ctx.saved_tensors
        kern = ctx.kern
        g = g.contiguous()
        dvalues = kern.pair_dot(indices, g, W_dec) if ctx.needs_input_grad[1] else None
        dW = None
        if ctx.needs_input_grad[2]:
            F = W_dec.shape[0]
            dW, _ = kern.segment_reduce(kern.reverse_index(indices, F), values, g, F)
        return None, dvalues, dW, None


class SparseMSE(torch.autograd.Function):
    """mse = mean over rows of ||r||^2, r = x_hat + b - x with x_hat = sparse decode of (indices, values).

    The forward also takes D = pair_dot(idx, r, W_dec) while each row's k decoder rows are in cache, so the
    backward reads no decoder row: with c = 2 dL/dmse / N, dvalues = c D, dW_dec = segment_reduce(rev, c values,
    r), db = c sum_n r[n] (summed in the forward's pass), dx = -c r. r is returned too (not differentiable: AuxK
    uses it detached)."""

    @staticmethod
    def forward(ctx, indices, values, W_dec, b, x, kern):
        with torch.no_grad():
            r, D, sq, colsum = kern.decode_residual(indices, values, W_dec, b, x)
            mse = (sq / max(r.shape[0], 1)).to(r.dtype)
        ctx.save_for_backward(indices, values, r, D, colsum)
        ctx.kern, ctx.n_features = kern, W_dec.shape[0]
        ctx.mark_non_differentiable(r)
        ctx.set_materialize_grads(False)  # r is not differentiable: no [N, d] zeros for its gradient
        return mse, r

    @staticmethod
    def backward(ctx, g, _gr):
        if g is None:
            return None, None, None, None, None, None
        indices, values, r, D, colsum = ctx.saved_tensors
        kern = ctx.kern
        c = 2 * g / max(r.shape[0], 1)
        dvalues = D * c if ctx.needs_input_grad[1] else None
        dW = db = dx = None
        if ctx.needs_input_grad[2]:
            n_features = ctx.n_features
            dW, _ = kern.segment_reduce(kern.reverse_index(indices, n_features), values * c, r, n_features)
        if ctx.needs_input_grad[3]:
            db = colsum * c
        if ctx.needs_input_grad[4]:
            dx = r * -c
        return None, dvalues, dW, db, dx, None


# ------------------------------------------------------------------------------------------------------------
# Public ops
# ------------------------------------------------------------------------------------------------------------


def _first_bad_row(t: torch.Tensor, bad: torch.Tensor) -> int:
    """The first row of `t` where the boolean mask `bad` (same shape) holds."""
    return int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0, 0])


def _check_encoder(op: str, x, W_enc, b_enc):
    """Shapes, dtypes, devices and finiteness of an encoder's inputs, checked once at the dispatch point (one
    pass over x and W_enc, one host sync): every backend then sees valid inputs. A NaN or inf would otherwise
    reach the kernels, which disagree on it (torch.topk ranks NaN first; a running-minimum scan never keeps it)."""
    if x.dim() != 2 or W_enc.dim() != 2 or b_enc.dim() != 1:
        raise UserError(f"{op} expects x [N, d], W_enc [F, d], b_enc [F]; got x {tuple(x.shape)}, "
                        f"W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}")
    if x.shape[1] != W_enc.shape[1] or b_enc.shape[0] != W_enc.shape[0]:
        raise UserError(f"{op} shapes disagree: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}, "
                        f"b_enc {tuple(b_enc.shape)} (need x [N, d], W_enc [F, d], b_enc [F])")
    named = {"x": x, "W_enc": W_enc, "b_enc": b_enc}
    _check_float(op, named)
    if _all_finite(named.values()):
        return
    finite = [bool(torch.isfinite(t).all()) for t in named.values()]
    if not all(finite):
        name, t = next((n, t) for (n, t), ok in zip(named.items(), finite) if not ok)
        where = f" row {_first_bad_row(t, ~torch.isfinite(t))}" if t.dim() == 2 else ""
        raise UserError(f"{op}: {name}{where} holds NaN or inf; the SAE ops need finite inputs (check the "
                        f"activations, or the weights for a diverged training run)")


def _all_finite(tensors) -> bool:
    """True if every tensor's sum is finite: one vectorised pass each, one host sync (~30x cheaper than
    isfinite().all(), which makes four passes). A NaN or inf anywhere makes its sum non-finite; False can also
    mean a sum of finite values overflowed, so the caller checks element-wise then."""
    sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors]
    return bool(torch.isfinite(torch.stack(sums)).all())


def _check_float(op: str, named: dict) -> None:
    """All tensors of `named` share one floating dtype and one device."""
    first, t0 = next(iter(named.items()))
    for name, t in named.items():
        if not t.is_floating_point():
            raise UserError(f"{op}: {name} has dtype {t.dtype}; expected a floating-point tensor")
        if t.dtype != t0.dtype or t.device != t0.device:
            raise UserError(f"{op}: {name} is {t.dtype} on {t.device} but {first} is {t0.dtype} on {t0.device}; "
                            f"convert them to one dtype and device")


def _check_code(op: str, indices, values, W_dec) -> torch.Tensor:
    """A sparse code's shapes, dtypes, devices and index range (one min/max over the [N, k] indices, one host
    sync), checked once for every backend. Returns the indices as int64."""
    if indices.shape != values.shape or indices.dim() != 2 or W_dec.dim() != 2:
        raise UserError(f"{op} expects indices and values [N, k] and W_dec [F, d]; got indices "
                        f"{tuple(indices.shape)}, values {tuple(values.shape)}, W_dec {tuple(W_dec.shape)}")
    _check_float(op, {"values": values, "W_dec": W_dec})
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise UserError(f"{op}: indices has dtype {indices.dtype}; expected an integer tensor (int64)")
    if indices.device != values.device:
        raise UserError(f"{op}: indices is on {indices.device} but values on {values.device}")
    indices = indices.long()
    F = W_dec.shape[0]
    if indices.numel():
        lo, hi = (int(v) for v in torch.stack(list(torch.aminmax(indices))).tolist())
        if lo < 0 or hi >= F:
            bad = (indices < 0) | (indices >= F)
            row = _first_bad_row(indices, bad)
            value = int(indices[row][bad[row]][0])
            raise UserError(f"{op}: indices row {row} holds feature {value}, outside [0, {F}) (W_dec has F = {F} "
                            f"rows); indices must come from an encoder of this dictionary")
    return indices


def _check_k(k: int, n_features: int) -> None:
    if not 1 <= k <= n_features:
        raise UserError(f"k={k} must be between 1 and the number of features F={n_features}")


def topk_encode(x, W_enc, b_enc, k: int, relu: bool = True, backend: str = "auto") -> SparseCode:
    """pre = x @ W_enc.T + b_enc; keep the k largest per row (then ReLU if `relu`).

    Rows are processed in chunks (or fused tiles on the GPU), so the [N, F] pre-activation matrix never
    exists. The k pairs of a row come in no particular order. Differentiable in x, W_enc and b_enc."""
    _check_encoder("topk_encode", x, W_enc, b_enc)
    _check_k(k, W_enc.shape[0])
    kern = _kernels(x, backend)
    return SparseCode(*SparseEncode.apply(x, W_enc, b_enc, kern, _select_topk, k, relu))


def batch_topk_encode(x, W_enc, b_enc, k: int, relu: bool = True, backend: str = "auto") -> SparseCode:
    """BatchTopK: keep the k*N largest (ReLU'd) pre-activations over the whole batch of N rows.

    Exact, in two chunked passes (find the (k*N)-th largest value tau, then keep every pre >= tau). Ties at
    tau are all kept (so a row set may exceed k*N pairs only on exact float ties); under ReLU, zeros are never
    kept. Rows hold different counts: each row's pairs come first (largest first), then padding up to the
    largest row count with value 0 (index = slot number)."""
    _check_encoder("batch_topk_encode", x, W_enc, b_enc)
    _check_k(k, W_enc.shape[0])
    kern = _kernels(x, backend)
    return SparseCode(*SparseEncode.apply(x, W_enc, b_enc, kern, _select_batch_topk, k, relu))


def threshold_encode(x, W_enc, b_enc, threshold, backend: str = "auto") -> SparseCode:
    """Inference with a learned threshold theta (BatchTopK / JumpReLU): keep every pre > theta.

    `threshold` is a scalar or a per-feature [F] tensor (not differentiated). Padded like
    batch_topk_encode."""
    _check_encoder("threshold_encode", x, W_enc, b_enc)
    if isinstance(threshold, torch.Tensor) and threshold.numel() not in (1, W_enc.shape[0]):
        raise UserError(f"threshold must be a scalar or have one value per feature ({W_enc.shape[0]}); "
                        f"got shape {tuple(threshold.shape)}")
    kern = _kernels(x, backend)
    return SparseCode(*SparseEncode.apply(x, W_enc, b_enc, kern, _select_threshold, threshold, False))


def _select_threshold(kern, x, W, b, threshold, relu):
    return _select_above(kern, x, W, b, threshold)


def sparse_decode(indices, values, W_dec, backend: str = "auto") -> torch.Tensor:
    """x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]]  ->  [N, d] (no bias).

    Differentiable in values and W_dec; neither direction materialises [N, F] or [N, k, d]."""
    indices = _check_code("sparse_decode", indices, values, W_dec)
    kern = _kernels(values, backend)
    return SparseDecode.apply(indices, values, W_dec, kern)


def sparse_mse(indices, values, W_dec, b, x, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(mse, r): r = sparse_decode(indices, values, W_dec) + b - x [N, d] and mse = mean over rows of ||r||^2.

    The SAE reconstruction loss in one op: one pass over each row's k decoder rows serves the forward and the
    gradient of the values (see SparseMSE). Differentiable in values, W_dec, b and x; r is not (detached)."""
    indices = _check_code("sparse_mse", indices, values, W_dec)
    if b.shape != (W_dec.shape[1],) or x.dim() != 2 or x.shape != (indices.shape[0], W_dec.shape[1]):
        raise UserError(f"sparse_mse expects b [d] and x [N, d] with N = {indices.shape[0]}, d = {W_dec.shape[1]}; "
                        f"got b {tuple(b.shape)}, x {tuple(x.shape)}")
    _check_float("sparse_mse", {"values": values, "W_dec": W_dec, "b": b, "x": x})
    kern = _kernels(values, backend)
    return SparseMSE.apply(indices, values, W_dec, b, x, kern)


# ------------------------------------------------------------------------------------------------------------
# Data movement: the shard loader's batch gather.
# ------------------------------------------------------------------------------------------------------------


def row_gatherer(backend: str = "auto"):
    """The shard loader's batch gather: `gather(arrays, offsets, starts, lengths, out)` fills out with the rows of
    runs [starts[i], starts[i] + lengths[i]) of global row ids, in order of their starts (ties: in the given
    order), from the row-stacked numpy `arrays` (array s holds rows [offsets[s], offsets[s + 1])); starts,
    lengths and offsets are int64 numpy arrays.

    "cpp": one copy per stretch of touching runs within a shard, streaming stores, the sort and the copies with
    the GIL released (so the loader's threads gather in parallel); "torch" (the fallback when the extension does
    not build): numpy's take, array by array. Both write the same bytes. Resolve it once, outside worker threads:
    the first call may build the C++ extension."""
    import numpy as np

    if backend not in ("auto", "cpp", "torch"):
        raise UserError(f"row_gatherer backend {backend!r}: choose auto, cpp or torch")
    kern = _cpp_kernels() if backend != "torch" else None
    if backend == "cpp" and kern is None:
        raise UserError("backend 'cpp' is unavailable: the C++ extension did not build (see the warning above)")
    bases: dict[tuple, tuple] = {}  # the arrays' ids -> (the arrays, kept alive, and their start addresses)

    def cpp(arrays, offsets, starts, lengths, out):
        key = tuple(map(id, arrays))  # the loader passes the same arrays every batch: ~1 us per lookup, not 10
        if key not in bases:
            if len(bases) > 64:
                bases.clear()
            bases[key] = (list(arrays), np.array([a.ctypes.data for a in arrays], np.int64))
        kern.ext.gather_runs(bases[key][1], offsets, starts, lengths, out, out.itemsize * int(np.prod(out.shape[1:])))

    def take(arrays, offsets, starts, lengths, out):
        order = np.argsort(starts, kind="stable")
        starts, lengths = starts[order], lengths[order]
        rows = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
        if not len(rows):
            return
        shard_of = np.searchsorted(offsets, rows, "right") - 1
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(shard_of)) + 1, [len(rows)]])
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            s = int(shard_of[lo])
            np.take(arrays[s], rows[lo:hi] - offsets[s], axis=0, out=out[lo:hi], mode="clip")  # 'raise' buffers

    return take if kern is None else cpp
