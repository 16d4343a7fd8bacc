"""The Triton kernels address memory with 64-bit offsets (issue 10, item 4): a row or feature number times a row
length (N * d, F * d, N * F) passes 2^31 elements at realistic sizes, and computed in int32 it wraps, so the
kernel reads or writes the wrong place (a segfault, or garbage on a GPU).

Every product is taken past 2^31 for real, in Triton's CPU interpreter, at little cost: the big operands are
torch.empty tensors (address space only; the pages a kernel never touches cost no memory) and only the last
program of the launch runs, the one whose rows or features lie past element 2^31 (the interpreter would
otherwise walk every program of the grid, ~90 ns per element loaded: minutes per kernel). Its output is compared
with float64. Each group runs in a child process under TRITON_INTERPRET=1, so a wrapped offset that segfaults
is reported as a failure (its last printed case names the kernel), and the test runs the same way on a GPU
machine."""

import contextlib
import inspect
import os
import resource
import subprocess
import sys

import pytest
import torch
import triton.language as tl  # noqa: F401 - the interpreter patches the language seen from the launched function

TWO31 = 2**31


@pytest.mark.parametrize("group", ["encode", "sparse"])
def test_kernel_offsets_past_2_31_elements(group):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, group], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
    assert out.stdout.count("ok ") == len(GROUPS[group]), out.stdout


# --- the child process ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def last_programs(axis: int):
    """Run, of each kernel launch, only the programs that are last along grid `axis`."""
    from triton.runtime import interpreter

    init = interpreter.GridExecutor.__init__
    ran = []

    def patched(self, fn, *args, **kwargs):
        init(self, fn, *args, **kwargs)
        kernel = self.fn

        def selected(**kw):
            b = interpreter.interpreter_builder
            if b.grid_idx[axis] == b.grid_dim[axis] - 1:
                ran.append(b.grid_idx)
                kernel(**kw)

        selected.__signature__ = inspect.signature(kernel)
        self.fn = selected

    interpreter.GridExecutor.__init__ = patched
    try:
        yield ran
    finally:
        interpreter.GridExecutor.__init__ = init
    assert ran, "no program ran"


def close(name, ours, ref, tol=1e-5):
    err = float((ours.double() - ref).norm() / ref.norm())
    assert err <= tol, f"{name}: relative error {err:.3g} against float64"


def randn(*shape, g):
    return torch.randn(*shape, generator=g)


def linear_weight_rows():
    """linear: weight rows f with f * d past 2^31 (feats * D), W[F, d] of 8 GiB; the last feature block runs."""
    from sae_fast.kernels import encode

    g = torch.Generator().manual_seed(0)
    d, bf = 64, encode.BLOCK_F
    F = TWO31 // d + bf  # the last block of bf features starts at element 2^31
    W, b = torch.empty(F, d), torch.empty(F)
    W[-bf:], b[-bf:] = randn(bf, d, g=g), randn(bf, g=g)
    x = randn(3, d, g=g)
    with last_programs(axis=1):
        out = encode.linear(x, W, b)
    close("linear", out[:, -bf:], x.double() @ W[-bf:].double().T + b[-bf:].double())


def linear_input_and_output_rows():
    """linear: rows n of x[N, d] and out[N, F] with n * d and n * F past 2^31 (the dense k >= F/4 decode runs
    this kernel on codes [N, F]); the last row block runs."""
    from sae_fast.kernels import encode

    g = torch.Generator().manual_seed(1)
    d = F = 64
    bn = encode.BLOCK_N
    N = TWO31 // d + bn
    x = torch.empty(N, d)
    x[-bn:] = randn(bn, d, g=g)
    W, b = randn(F, d, g=g), randn(F, g=g)
    with last_programs(axis=0):
        out = encode.linear(x, W, b)
    close("linear rows", out[-bn:], x[-bn:].double() @ W.double().T + b.double())


def topk_input_rows():
    """fused top-k: rows of x[N, d] past element 2^31; the last row block runs."""
    from sae_fast.kernels import encode

    g = torch.Generator().manual_seed(2)
    d, F, k, bn = 64, 300, 5, encode.BLOCK_N
    N = TWO31 // d + bn
    x = torch.empty(N, d)
    x[-bn:] = randn(bn, d, g=g)
    W, b = randn(F, d, g=g), randn(F, g=g)
    with last_programs(axis=0):
        values, idx = encode.topk(x, W, b, k)
    ref = x[-bn:].double() @ W.double().T + b.double()
    values, idx = values[-bn:], idx[-bn:]
    assert torch.equal(idx.sort(1).values, ref.topk(k, 1).indices.sort(1).values), "topk rows: wrong features"
    close("topk rows", values, ref.gather(1, idx))


def gather_combine_rows():
    """gather_combine: rows n of idx/w[N, k] and out[N, d] with n * d past 2^31; the last row block runs."""
    from sae_fast.kernels import sparse

    g = torch.Generator().manual_seed(3)
    d, F, k, bn = 64, 100, 4, sparse.BLOCK_N
    N = TWO31 // d + bn
    idx, w = torch.empty(N, k, dtype=torch.long), torch.empty(N, k)
    idx[-bn:], w[-bn:] = torch.randint(0, F, (bn, k), generator=g), randn(bn, k, g=g)
    M = randn(F, d, g=g)
    with last_programs(axis=0):
        out = sparse.gather_combine(idx, w, M)
    close("gather_combine rows", out[-bn:], (w[-bn:].double()[:, :, None] * M.double()[idx[-bn:]]).sum(1))


def pair_dot_rows():
    """pair_dot: rows n of G[N, d] with n * d past 2^31; the last row block runs."""
    from sae_fast.kernels import sparse

    g = torch.Generator().manual_seed(4)
    d, F, k, bn = 64, 100, 4, sparse.BLOCK_N
    N = TWO31 // d + bn
    idx, G = torch.empty(N, k, dtype=torch.long), torch.empty(N, d)
    idx[-bn:], G[-bn:] = torch.randint(0, F, (bn, k), generator=g), randn(bn, d, g=g)
    M = randn(F, d, g=g)
    with last_programs(axis=0):
        out = sparse.pair_dot(idx, G, M)
    close("pair_dot rows", out[-bn:], (M.double()[idx[-bn:]] @ G[-bn:].double()[:, :, None]).squeeze(2))


def segment_reduce_feature_rows():
    """segment_reduce (dW_dec, dW_enc): output rows f with f * d past 2^31, out[F, d] of 8 GiB; the last
    feature block runs, its segments filled from a few tokens whose features all lie in that block."""
    from sae_fast.kernels import sparse

    g = torch.Generator().manual_seed(5)
    d, k, n, bf = 64, 4, 40, sparse.BLOCK_FEAT
    F = TWO31 // d + bf
    first = F - bf
    idx = first + torch.stack([torch.randperm(bf, generator=g)[:k] for _ in range(n)])
    w, X = randn(n, k, g=g), randn(n, d, g=g)
    order = torch.argsort(idx.reshape(-1), stable=True)
    offsets = torch.empty(F + 1, dtype=torch.long)  # only the last block's offsets are read
    offsets[first:] = torch.searchsorted(idx.reshape(-1).sort().values, torch.arange(first, F + 1))
    with last_programs(axis=0):
        out, sums = sparse.segment_reduce(order, offsets, w, X, with_sum=True)
    onehot = torch.zeros(n, k, bf, dtype=torch.float64).scatter_(2, (idx - first)[:, :, None], 1.0)
    code = (onehot * w.double()[:, :, None]).sum(1)  # [n, bf]
    close("segment_reduce rows", out[first:], code.T @ X.double())
    close("segment_reduce sums", sums[first:], code.sum(0))


def decode_weight_rows():
    """gather_combine and pair_dot read W_dec[F, d] rows f with f * d past 2^31 (feature indices from codes);
    every program runs."""
    from sae_fast.kernels import sparse

    g = torch.Generator().manual_seed(6)
    d, N, k = 64, 3, 4
    F = TWO31 // d + 40
    W = torch.empty(F, d)
    rows = torch.tensor([0, 5, F - 40, F - 39, F - 17, F - 2, F - 1])  # two early rows, the rest past 2^31
    W[rows] = randn(len(rows), d, g=g)
    pick = torch.stack([torch.randperm(len(rows), generator=g)[:k] for _ in range(N)])
    pick[:, 0] = len(rows) - 1 - torch.arange(N)
    idx = rows[pick]
    assert ((idx * d) >= TWO31).any(1).all()
    w, G = randn(N, k, g=g), randn(N, d, g=g)
    Wi = W[idx].double()
    close("gather_combine weights", sparse.gather_combine(idx, w, W), (w.double()[:, :, None] * Wi).sum(1))
    close("pair_dot weights", sparse.pair_dot(idx, G, W), (Wi @ G.double()[:, :, None]).squeeze(2))


GROUPS = {"encode": [linear_weight_rows, linear_input_and_output_rows, topk_input_rows],
          "sparse": [gather_combine_rows, pair_dot_rows, segment_reduce_feature_rows, decode_weight_rows]}

if __name__ == "__main__":
    for case in GROUPS[sys.argv[1]]:
        print("running", case.__name__, flush=True)
        case()
        print("ok", case.__name__, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
    assert peak < 6, f"peak resident memory {peak:.1f} GiB: the untouched pages were touched"
    print(f"peak resident memory {peak:.2f} GiB")
