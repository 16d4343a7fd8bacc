"""`sae-fast bench decode`: the sparse decoder, forward + backward, ours vs dense PyTorch (and eai-sparsify).

Reference: a plain PyTorch SAE's decoder: the dense [N, F] code (k nonzeros per row) times W_dec with autograd
(gradients for the dense code and W_dec). Ours: sae_fast.ops.sparse_decode with the device's auto backend
(gradients for the k values and W_dec). Also reported: the floor (the bare encoder GEMM at the same N, the
same flops as the dense decode), and eai-sparsify's decoders on the same tensors: eager_decode (embedding_bag)
and, on CUDA, triton_decode (its xformers kernel).

Default case: fp32, d=640, F=5120, k=32, N=4096, on the CPU and on CUDA where present. --quick: small sizes.
"""

from __future__ import annotations

import torch

from sae_fast import ops
from sae_fast.benchmarks.common import time_fn
from sae_fast.benchmarks.encode import FULL, QUICK, devices, encoder_tensors, kernel_record


def run(quick: bool = False) -> list[dict]:
    cfg = QUICK if quick else FULL
    return [bench_device(device, cfg, repeat=3 if quick else 5) for device in devices()]


def bench_device(device: str, cfg: dict, repeat: int) -> dict:
    N, d, F, k = cfg["N"], cfg["d"], cfg["F"], cfg["k"]
    x, W_enc, b = (t.detach() for t in encoder_tensors(N, d, F, device))
    with torch.no_grad():
        code = ops.topk_encode(x, W_enc, b, k)
    idx = code.indices
    values = code.values.clone().requires_grad_()
    dense = code.to_dense(F).requires_grad_()
    W_dec = torch.randn(F, d, device=device).requires_grad_()
    g = torch.randn(N, d, device=device)

    def ours():
        values.grad = W_dec.grad = None
        ops.sparse_decode(idx, values, W_dec).backward(g)

    def reference():
        dense.grad = W_dec.grad = None
        (dense @ W_dec).backward(g)

    def timed_sparsify(decode):
        def step():
            values.grad = W_dec.grad = None
            decode(idx, values, W_dec.mT).backward(g)

        return time_fn(step, repeat=repeat)

    extra = {}
    try:
        from sparsify.utils import eager_decode, triton_decode

        extra["sparsify_eager_decode_s"] = timed_sparsify(eager_decode)
        if device == "cuda":
            extra["sparsify_triton_decode_s"] = timed_sparsify(triton_decode)
    except ImportError:
        pass
    return kernel_record("decode", cfg, device, ours, reference, (x, W_enc, b), repeat, **extra)
