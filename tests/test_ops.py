"""sae_fast.ops against plain dense float64 PyTorch, for every backend.

Encoders: the selection is checked as a set against the float64 top-k (a row may differ only where the float64
k-th and (k+1)-th values are closer than fp32 can resolve, and then ours must still be a top-k up to that
tolerance); values and every gradient are then compared with the float64 reference evaluated at our pairs.
Decode: output and gradients against a dense [N, F] code times W_dec in float64. Relative error = ||ours -
ref|| / ||ref|| <= 1e-5 on fp32 inputs.

Every backend runs the full grid N x d x F x k (triton's sparse kernels where k < F/4, its dense tile-GEMM route
above); triton also gets its multi-slice top-k merge and large-k path. With ReLU, the mask is ours: fp32 and
fp64 may disagree on a sign within rounding of 0, and only there.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from sae_fast import ops
from sae_fast.errors import UserError

TOL = 1e-5
# Rows: one, an odd count, and many. "Many" is [Y]'s batch of 4,096 on a GPU; on the CPU it is 1,000, which still
# spans two row chunks of the encoder at F = 5,120 (ops.CHUNK_ELEMENTS // F = 819 rows) with an uneven last one,
# and costs a quarter of the Triton interpreter's time (offsets past 2^31 are tests/test_triton_offsets.py's).
MANY = 4096 if torch.cuda.is_available() else 1000
GRID = list(itertools.product([1, 37, MANY], [8, 640], [64, 5120], [1, 32, "F"]))
def grid_cases():
    for backend in ("torch", "cpp", "triton"):
        for case in GRID:
            yield pytest.param(backend, *case, id=f"{backend}-{'-'.join(map(str, case))}")


@pytest.fixture
def backend(request):
    """Resolve a backend name; the Triton interpreter runs numpy tile products: keep BLAS single-threaded."""
    name = request.param
    if name == "cpp" and ops._cpp_kernels() is None:
        pytest.fail("the C++ extension did not build (see the warning); these tests need a C++ compiler")
    limit = contextlib.nullcontext()
    if name == "triton" and not torch.cuda.is_available():
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(1)
    with limit:
        yield name


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def rel(ours, ref):
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    assert ours.shape == ref.shape
    denom = ref.norm()
    return float((ours - ref).norm() / denom) if denom > 0 else float(ours.norm())


def make_encoder(N, d, F, device, bias_scale=0.1):
    x = torch.randn(N, d, device=device, requires_grad=True)
    W = (torch.randn(F, d, device=device) / d**0.5).requires_grad_()
    b = (bias_scale * torch.randn(F, device=device)).requires_grad_()
    return x, W, b


def dense_pre64(x, W, b):
    x64, W64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, W, b))
    return x64, W64, b64, x64 @ W64.T + b64


def check_topk_selection(idx, pre64, k):
    """Our per-row sets equal the float64 top-k sets, except on rows with a near tie at rank k."""
    idx = idx.cpu()
    ref_v, ref_i = pre64.detach().topk(k, dim=1)
    ours_sorted = idx.sort(1).values
    dup = (ours_sorted.diff(dim=1) == 0).any(1)
    assert not dup.any(), f"duplicate indices in rows {dup.nonzero().flatten()[:10].tolist()}"
    same = (ours_sorted == ref_i.sort(1).values).all(1)
    if not same.all():
        tol = 1e-5 * float(pre64.detach().abs().max())
        kth = ref_v[:, -1:]
        ours = pre64.detach().gather(1, idx)
        assert (ours[~same] >= kth[~same] - tol).all(), "selection is not a top-k (beyond float tolerance)"


def check_encode_grads(code, x, W, b, x64, W64, b64, pre64, relu, valid=None):
    """Values and gradients of sum(values * G) against float64 autograd at our (row, feature) pairs."""
    idx = code.indices.cpu()
    vals64 = pre64.gather(1, idx)
    if relu:
        # The ReLU mask is ours: fp32 and fp64 may disagree on the sign of a pre-activation within rounding of
        # 0 (with k = F over 21M pairs a few always do, and each flips a whole gradient term), but nowhere else.
        active = code.values.detach().cpu() > 0
        flipped = active != (vals64.detach() > 0)
        assert (vals64.detach()[flipped].abs() <= 1e-5 * float(pre64.detach().abs().max())).all()
        vals64 = torch.where(active, vals64, 0)
    if valid is not None:
        vals64 = torch.where(valid, vals64, 0)
    assert rel(code.values, vals64) <= TOL
    G = torch.randn(code.values.shape, dtype=torch.float64)
    (code.values * G.to(code.values)).sum().backward()
    (vals64 * G).sum().backward()
    for ours, ref in ((x, x64), (W, W64), (b, b64)):
        assert rel(ours.grad, ref.grad) <= TOL


def run_topk_case(backend, N, d, F, k, relu=True):
    k = F if k == "F" else k
    x, W, b = make_encoder(N, d, F, device_for(backend))
    code = ops.topk_encode(x, W, b, k, relu=relu, backend=backend)
    assert code.indices.shape == (N, k) and code.values.shape == (N, k) and code.indices.dtype == torch.long
    x64, W64, b64, pre64 = dense_pre64(x, W, b)
    check_topk_selection(code.indices, pre64, k)
    check_encode_grads(code, x, W, b, x64, W64, b64, pre64, relu)


def run_decode_case(backend, N, d, F, k):
    k = F if k == "F" else k
    device = device_for(backend)
    idx = torch.rand(N, F, device=device).topk(k, dim=1).indices  # distinct features per row
    values = torch.randn(N, k, device=device, requires_grad=True)
    W_dec = torch.randn(F, d, device=device, requires_grad=True)
    out = ops.sparse_decode(idx, values, W_dec, backend=backend)
    v64, W64 = (t.detach().double().cpu().requires_grad_() for t in (values, W_dec))
    ref = torch.zeros(N, F, dtype=torch.float64).scatter_add(1, idx.cpu(), v64) @ W64
    assert rel(out, ref) <= TOL
    G = torch.randn(N, d, dtype=torch.float64)
    (out * G.to(out)).sum().backward()
    (ref * G).sum().backward()
    assert rel(values.grad, v64.grad) <= TOL
    assert rel(W_dec.grad, W64.grad) <= TOL


all_backends = pytest.mark.parametrize("backend", ["torch", "cpp", "triton"], indirect=True)


@pytest.mark.parametrize("backend,N,d,F,k", list(grid_cases()), indirect=["backend"])
def test_topk_encode_grid(backend, N, d, F, k):
    run_topk_case(backend, N, d, F, k)


@pytest.mark.parametrize("backend,N,d,F,k", list(grid_cases()), indirect=["backend"])
def test_sparse_decode_grid(backend, N, d, F, k):
    run_decode_case(backend, N, d, F, k)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_fused_topk_feature_slices(backend):
    """The fused kernel over several feature slices (the GPU's default) and its merge, on odd sizes."""
    from sae_fast.kernels import encode

    device = device_for(backend)
    x, W, b = (t.detach() for t in make_encoder(70, 24, 1500, device))
    for splits in (1, 3):
        values, idx = encode.topk(x, W, b, 20, splits=splits)
        _, _, _, pre64 = dense_pre64(x, W, b)
        check_topk_selection(idx, pre64, 20)
        assert rel(values, pre64.gather(1, idx.cpu())) <= TOL


@all_backends
def test_relu_false_keeps_negative_values(backend):
    run_topk_case(backend, 37, 8, 64, 32, relu=False)


@all_backends
def test_empty_batch(backend):
    x, W, b = make_encoder(0, 8, 64, device_for(backend))
    codes = (ops.topk_encode(x, W, b, 5, backend=backend), ops.batch_topk_encode(x, W, b, 5, backend=backend),
             ops.threshold_encode(x, W, b, 0.5, backend=backend))
    for code in codes:
        assert code.indices.shape[0] == 0 and code.values.shape[0] == 0
        out = ops.sparse_decode(code.indices, code.values, W, backend=backend)
        assert out.shape == (0, 8)
        out.sum().backward()
        assert W.grad.abs().sum() == 0 and b.grad.abs().sum() == 0
        W.grad = b.grad = None


def check_padded(code, keep64, pre64, relu):
    """A padded code holds exactly the pairs in the boolean [N, F] `keep64`; padding has value 0."""
    N, F = keep64.shape
    counts = keep64.sum(1)
    assert code.values.shape[1] == (int(counts.max()) if N else 0)
    idx, vals = code.indices.cpu(), code.values.detach().cpu()
    slot_valid = torch.arange(idx.shape[1]) < counts[:, None]
    ours = torch.zeros(N, F, dtype=torch.bool).scatter_(1, torch.where(slot_valid, idx, 0), slot_valid)
    assert torch.equal(ours, keep64)
    assert (vals[~slot_valid] == 0).all()
    assert ((idx >= 0) & (idx < F)).all()
    return slot_valid


@all_backends
@pytest.mark.parametrize("relu", [True, False])
def test_batch_topk_encode(backend, relu):
    N, d, F, k = 37, 24, 300, 7
    x, W, b = make_encoder(N, d, F, device_for(backend), bias_scale=1.0)
    code = ops.batch_topk_encode(x, W, b, k, relu=relu, backend=backend)
    x64, W64, b64, pre64 = dense_pre64(x, W, b)
    flat = pre64.detach().relu().reshape(-1) if relu else pre64.detach().reshape(-1)
    tau = flat.topk(k * N).values[-1]
    keep = (pre64.detach() >= tau) & ((pre64.detach() > 0) if relu else True)
    assert keep.sum() == k * N
    assert (code.values != 0).sum() == k * N  # rows differ in count, the batch total is k * N
    valid = check_padded(code, keep, pre64, relu)
    check_encode_grads(code, x, W, b, x64, W64, b64, pre64, relu=False, valid=valid)


@all_backends
@pytest.mark.parametrize("per_feature", [False, True])
def test_threshold_encode_with_empty_rows(backend, per_feature):
    N, d, F = 41, 16, 200
    device = device_for(backend)
    x, W, b = make_encoder(N, d, F, device)
    theta = torch.rand(F, device=device) + 1.5 if per_feature else 2.2
    code = ops.threshold_encode(x, W, b, theta, backend=backend)
    x64, W64, b64, pre64 = dense_pre64(x, W, b)
    th64 = theta.double().cpu() if per_feature else theta
    keep = pre64.detach() > th64
    assert (keep.sum(1) == 0).any() and keep.any(), "the case should have both empty and non-empty rows"
    valid = check_padded(code, keep, pre64, relu=False)
    check_encode_grads(code, x, W, b, x64, W64, b64, pre64, relu=False, valid=valid)
    # a threshold above every value gives N empty rows
    none = ops.threshold_encode(x, W, b, float("inf"), backend=backend)
    assert none.values.shape == (N, 0)


def run_mse_case(backend, N, d, F, k, empty_rows=0):
    """ops.sparse_mse (the fused decode + residual + pair dots) against a dense float64 reconstruction loss:
    the mse, the residual and the gradients of values, W_dec, b_pre and x. The first `empty_rows` rows have all
    values 0 (a row nothing fired on)."""
    device = device_for(backend)
    idx = torch.rand(N, F, device=device).topk(k, dim=1).indices
    values = torch.randn(N, k, device=device)
    values[:empty_rows] = 0
    values.requires_grad_()
    W_dec = torch.randn(F, d, device=device, requires_grad=True)
    b = torch.randn(d, device=device, requires_grad=True)
    x = torch.randn(N, d, device=device, requires_grad=True)
    mse, r = ops.sparse_mse(idx, values, W_dec, b, x, backend=backend)
    v64, W64, b64, x64 = (t.detach().double().cpu().requires_grad_() for t in (values, W_dec, b, x))
    r64 = torch.zeros(N, F, dtype=torch.float64).scatter_add(1, idx.cpu(), v64) @ W64 + b64 - x64
    mse64 = r64.pow(2).sum() / max(N, 1)
    assert not r.requires_grad and rel(r, r64) <= TOL and rel(mse, mse64) <= TOL
    (3 * mse).backward()
    (3 * mse64).backward()
    for ours, ref in ((values, v64), (W_dec, W64), (b, b64), (x, x64)):
        assert rel(ours.grad, ref.grad) <= TOL


@pytest.mark.parametrize("backend,N,d,F,k,empty", [
    pytest.param(backend, *case, id=f"{backend}-{'-'.join(map(str, case))}")
    for backend in ("torch", "cpp", "triton")
    for case in [(1, 8, 64, 1, 0), (37, 13, 101, 99, 5), (257, 640, 5120, 32, 3), (0, 8, 64, 3, 0),
                 (19, 235, 300, 7, 2)]],  # d = 235: the C++ AVX2 decode's 128-, 64-, 32-, 8-column blocks + a tail
    indirect=["backend"])
def test_sparse_mse(backend, N, d, F, k, empty):
    run_mse_case(backend, N, d, F, k, empty)


@pytest.mark.parametrize("backend", ["torch", "cpp"], indirect=True)
def test_gradcheck_float64(backend):
    """torch.autograd.gradcheck of the autograd Functions on tiny float64 inputs."""
    x, W, b = (t.detach().double().requires_grad_() for t in make_encoder(5, 4, 9, "cpu", bias_scale=1.0))
    W_dec = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)

    def encode_decode(x, W, b, W_dec):
        code = ops.topk_encode(x, W, b, 3, backend=backend)
        return ops.sparse_decode(code.indices, code.values, W_dec, backend=backend)

    assert torch.autograd.gradcheck(encode_decode, (x, W, b, W_dec), eps=1e-6, atol=1e-7)

    def threshold(x, W, b):
        return ops.threshold_encode(x, W, b, 0.3, backend=backend).values

    assert torch.autograd.gradcheck(threshold, (x, W, b), eps=1e-6, atol=1e-7)

    b_pre = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def mse(x, W, b, W_dec, b_pre):
        code = ops.topk_encode(x, W, b, 3, backend=backend)
        return ops.sparse_mse(code.indices, code.values, W_dec, b_pre, x, backend=backend)[0]

    assert torch.autograd.gradcheck(mse, (x, W, b, W_dec, b_pre), eps=1e-6, atol=1e-7)


def test_bad_input_raises_user_error():
    x, W, b = make_encoder(3, 4, 6, "cpu")
    with pytest.raises(UserError, match="k=7"):
        ops.topk_encode(x, W, b, 7)
    with pytest.raises(UserError, match="k=0"):
        ops.batch_topk_encode(x, W, b, 0)
    with pytest.raises(UserError, match="unknown ops backend"):
        ops.topk_encode(x, W, b, 2, backend="cuda")
    with pytest.raises(UserError, match="shapes disagree"):
        ops.topk_encode(x, W[:, :3], b, 2)
    with pytest.raises(UserError, match="one value per feature"):
        ops.threshold_encode(x, W, b, torch.zeros(5))
    with pytest.raises(UserError, match="sparse_decode expects"):
        ops.sparse_decode(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3), W)
    with pytest.raises(UserError, match="indices has dtype torch.float32"):
        ops.sparse_decode(torch.zeros(3, 2), torch.zeros(3, 2), W)
    with pytest.raises(UserError, match="W_dec is torch.float32 on cpu but values is torch.float64"):
        ops.sparse_decode(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.float64), W.detach())
    with pytest.raises(UserError, match="W_enc is torch.float64"):
        ops.topk_encode(x, W.double(), b, 2)
    with pytest.raises(UserError, match="x has dtype torch.int64"):
        ops.topk_encode(x.long(), W, b, 2)


@all_backends
@pytest.mark.parametrize("bad", [6, 10**6, 10**11, -1])
def test_sparse_decode_rejects_indices_outside_the_dictionary(backend, bad):
    """Out-of-range feature indices are refused at the dispatch point on every backend (c3e3240: the C++ kernel
    segfaulted at 1e11 and read outside W_dec at 1e6; Triton read anything)."""
    device = device_for(backend)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5]], device=device)
    idx[1, 0] = bad
    with pytest.raises(UserError, match=rf"sparse_decode: indices row 1 holds feature {bad}, outside \[0, 6\)"):
        ops.sparse_decode(idx, torch.ones(3, 2, device=device), torch.ones(6, 4, device=device), backend=backend)


@all_backends
@pytest.mark.parametrize("op", ["topk_encode", "batch_topk_encode", "threshold_encode"])
@pytest.mark.parametrize("where", ["x", "W_enc", "b_enc"])
def test_non_finite_inputs_are_refused_naming_the_row(backend, op, where):
    """A NaN row used to be handed to the kernels, which disagreed: torch.topk ranks NaN first, the C++ scan
    returned the previous row's picks. Every backend now refuses it, naming the argument and the row."""
    x, W, b = (t.detach() for t in make_encoder(6, 8, 64, device_for(backend)))
    target = {"x": x, "W_enc": W, "b_enc": b}[where]
    target[3] = float("nan")
    arg = {"topk_encode": 4, "batch_topk_encode": 4, "threshold_encode": 0.1}[op]
    row = "" if where == "b_enc" else " row 3"
    with pytest.raises(UserError, match=rf"{op}: {where}{row} holds NaN or inf"):
        getattr(ops, op)(x, W, b, arg, backend=backend)


@all_backends
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy product
def test_overflowing_pre_activations_raise_naming_the_row(backend):
    """Finite inputs whose product overflows: every backend reports the row instead of returning inf picks."""
    x, W, b = (t.detach() for t in make_encoder(5, 8, 64, device_for(backend)))
    x[2] = 3e38
    W.abs_()
    with pytest.raises(UserError, match="topk_encode: the pre-activations of row 2 overflow"):
        ops.topk_encode(x, W, b, 4, backend=backend)


def test_cpp_topk_rows_gives_a_nan_row_nan_not_the_previous_rows_picks():
    """The C++ scan never offers NaN to its buffer: at c3e3240 an all-NaN row returned the previous row's values
    and indices. It now writes NaN (which sae_fast.ops reports), for an all-NaN row and a partly-NaN one."""
    kern = ops._cpp_kernels()
    assert kern is not None, "the C++ extension did not build"
    for F in (20, 100):  # the scan's tail only, and its 16-lane blocks
        pre = torch.randn(4, F)
        pre[1] = float("nan")
        pre[2, F // 2] = float("nan")
        values, indices = kern.ext.topk_rows(pre, 3)
        assert values[[1, 2]].isnan().all()
        for r in (0, 3):
            ref = pre[r].topk(3)
            assert torch.equal(values[r].sort().values, ref.values.sort().values)
        assert ((indices >= 0) & (indices < F)).all()


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_offsets_past_2_31_elements(backend):
    """Row offsets row * stride beyond 2^31 elements (int32 would wrap: a segfault or wrong rows under the
    interpreter, garbage on a GPU). The inputs are views with a huge row stride over an untouched allocation
    (8 GiB of address space, a few pages of memory), so the kernels run in well under a second."""
    from sae_fast.kernels import encode, sparse

    device = device_for(backend)
    N, d, F = 5, 8, 64
    stride = (1 << 31) // (N - 1) + 17  # the last row starts past element 2^31
    x = torch.empty((N - 1) * stride + d, device=device).as_strided((N, d), (stride, 1))
    x.copy_(torch.randn(N, d))
    assert x.storage_offset() + (N - 1) * x.stride(0) > 2**31
    W, b = torch.randn(F, d, device=device), torch.randn(F, device=device)
    ref = x.double().cpu() @ W.double().cpu().T + b.double().cpu()
    assert rel(encode.linear(x, W, b), ref) <= TOL
    values, idx = encode.topk(x, W, b, 3)
    check_topk_selection(idx, ref, 3)
    assert rel(values, ref.gather(1, idx.cpu())) <= TOL
    pairs = torch.randint(0, F, (N, 4), device=device)
    ref_dot = (W.double().cpu()[pairs.cpu()] @ x.double().cpu()[:, :, None]).squeeze(2)
    assert rel(sparse.pair_dot(pairs, x, W), ref_dot) <= TOL


def test_auto_backend_choice():
    cpu = ops.backend_for(torch.zeros(1))
    assert cpu == ("cpp" if ops._cpp_kernels() is not None else "torch")
    if torch.cuda.is_available():
        assert ops.backend_for(torch.zeros(1, device="cuda")) == "triton"


def test_cpp_build_failure_falls_back_to_torch(monkeypatch, caplog):
    import sae_fast.csrc

    def no_compiler():
        raise RuntimeError("error: command 'c++' not found")

    monkeypatch.setattr(sae_fast.csrc, "load_extension", no_compiler)
    ops._cpp_kernels.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="sae_fast.ops"):
            assert ops.backend_for(torch.zeros(1)) == "torch"
        assert "C++ kernels unavailable" in caplog.text and "c++" in caplog.text
        with pytest.raises(UserError, match="backend 'cpp' is unavailable"):
            ops.topk_encode(*make_encoder(3, 4, 6, "cpu"), 2, backend="cpp")
    finally:
        ops._cpp_kernels.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_topk_rows_matches_torch_topk_with_ties_and_infinities(dtype):
    """The C++ row top-k (its AVX2 group-max path for fp32, the scalar one for fp64) against torch.topk: odd
    widths (tails past the last whole vector, fewer values than one group), k from 1 to F, coarse values with
    many exact ties (the k kept must then be the smallest indices among the tied), and -inf entries."""
    kern = ops._cpp_kernels()
    assert kern is not None, "the C++ extension did not build"
    gen = torch.Generator().manual_seed(0)
    for F in (1, 7, 8, 33, 100, 257, 1000, 5120, 5123):
        for k in sorted({1, 2, 5, 32, 64, F} & set(range(1, min(F, 64) + 1)) | ({F} if F <= 64 else set())):
            for kind in ("normal", "ties", "inf"):
                pre = torch.randn(19, F, generator=gen, dtype=dtype)
                if kind == "ties":
                    pre = (pre * 2).round()
                elif kind == "inf":
                    pre[pre < 0.5] = float("-inf")
                values, indices = kern.ext.topk_rows(pre.contiguous(), k)
                assert values.shape == (19, k) and indices.dtype == torch.long
                assert torch.equal(values, pre.gather(1, indices)), (F, k, kind)
                ours = indices.sort(1).values
                assert (ours.diff(dim=1) > 0).all(), (F, k, kind)  # k distinct features
                # the reference: largest values first, ties broken by the smaller index (a stable sort)
                ref = torch.sort(-pre, dim=1, stable=True).indices[:, :k].sort(1).values
                assert torch.equal(ours, ref), (F, k, kind)


@pytest.mark.parametrize("onednn", [False, True])
def test_cpp_both_gemm_paths(monkeypatch, onednn):
    """The C++ backend's encoder product takes oneDNN's linear on AVX-512 CPUs and BLAS elsewhere (fixed per
    machine): both paths, whichever this machine picks, against float64 (selection, values, gradients)."""
    kern = ops._cpp_kernels()
    assert kern is not None, "the C++ extension did not build"
    if onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(kern, "use_onednn", onednn)
    run_topk_case("cpp", 1000, 640, 5120, 32)
    run_topk_case("cpp", 37, 8, 64, 1)
