"""`sae-fast bench encode`: the TopK encoder, forward + backward, ours vs dense PyTorch (and eai-sparsify).

Reference: what a plain PyTorch SAE does: nn.Linear, torch.topk, scatter the k values into a dense [N, F]
code,
autograd through all of it (the upstream gradient is dense [N, F], as a dense decoder would send it). Ours:
sae_fast.ops.topk_encode with the device's auto backend (upstream gradient only on the k values). Each row
also reports the floor: one bare encoder GEMM x @ W_enc.T + b at the same N (ours_over_floor = ours_s /
floor_s; a training step cannot do less than this product), forward-only times, and eai-sparsify's
fused_encoder (Linear + ReLU + topk forward, index_add backward) on the same tensors.

Default case: fp32, d=640, F=5120, k=32, N=4096, on the CPU and on CUDA where present. --quick: small sizes.
"""

from __future__ import annotations

import torch

from sae_fast import ops
from sae_fast.benchmarks.common import device_name, record, time_fn

FULL = {"N": 4096, "d": 640, "F": 5120, "k": 32}
QUICK = {"N": 512, "d": 64, "F": 512, "k": 8}


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def encoder_tensors(N, d, F, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g).to(device).requires_grad_()
    W = (torch.randn(F, d, generator=g) / d**0.5).to(device).requires_grad_()
    b = (0.1 * torch.randn(F, generator=g)).to(device).requires_grad_()
    return x, W, b


def _zero_grads(*ts):
    for t in ts:
        t.grad = None


def run(quick: bool = False) -> list[dict]:
    cfg = QUICK if quick else FULL
    return [bench_device(device, cfg, repeat=3 if quick else 5) for device in devices()]


def bench_device(device: str, cfg: dict, repeat: int) -> dict:
    N, d, F, k = cfg["N"], cfg["d"], cfg["F"], cfg["k"]
    x, W, b = encoder_tensors(N, d, F, device)
    g_dense = torch.randn(N, F, device=device)
    g_pairs = torch.randn(N, k, device=device)

    def ours_fwd():
        with torch.no_grad():
            ops.topk_encode(x, W, b, k)

    def ours():
        _zero_grads(x, W, b)
        ops.topk_encode(x, W, b, k).values.backward(g_pairs)

    def reference_fwd():
        with torch.no_grad():
            pre = torch.nn.functional.linear(x, W, b)
            v, i = pre.topk(k, dim=1, sorted=False)
            torch.zeros_like(pre).scatter_(1, i, v.relu())

    def reference():
        _zero_grads(x, W, b)
        pre = torch.nn.functional.linear(x, W, b)
        v, i = pre.topk(k, dim=1, sorted=False)
        torch.zeros_like(pre).scatter(1, i, v.relu()).backward(g_dense)

    sparsify_s = None
    try:
        from sparsify.fused_encoder import fused_encoder

        def sparsify_enc():
            _zero_grads(x, W, b)
            fused_encoder(x, W, b, k, "topk").top_acts.backward(g_pairs)

        sparsify_s = time_fn(sparsify_enc, repeat=repeat)
    except ImportError:
        pass
    row = kernel_record("encode", cfg, device, ours, reference, (x, W, b), repeat,
                        ours_forward_s=time_fn(ours_fwd, repeat=repeat),
                        reference_forward_s=time_fn(reference_fwd, repeat=repeat), sparsify_fused_encoder_s=sparsify_s)
    row["speedup_vs_sparsify"] = sparsify_s / row["ours_s"] if sparsify_s else None
    return row


def kernel_record(bench: str, cfg: dict, device, ours, reference, encoder: tuple, repeat: int, **extra) -> dict:
    """Time `ours` and `reference` (forward + backward) and the floor, the bare encoder GEMM x W^T + b of the
    `encoder` tensors (x, W, b): the work no TopK SAE can skip. One record with both ratios."""
    x, W, b = encoder

    def floor():
        with torch.no_grad():
            torch.addmm(b, x, W.T)

    ours_s, floor_s = time_fn(ours, repeat=repeat), time_fn(floor, repeat=repeat)
    return record(bench, {**cfg, "dtype": "float32", "pass": "forward+backward"}, device_name(device), ours_s,
                  time_fn(reference, repeat=repeat), backend=ops.backend_for(x), floor_s=floor_s,
                  ours_over_floor=ours_s / floor_s, **extra)
