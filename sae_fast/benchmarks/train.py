"""`sae-fast bench train`: one full TopK SAE training step, ours vs a dense PyTorch step vs EleutherAI
sparsify.

A step = forward, backward, decoder-gradient projection, Adam, decoder renormalisation, on the same batch
(fp32; d=640, F=5120, k=32, N=4096 by default, as [Y]'s AIDO.Cell-100M SAE). Rows:

* reference: the dense step (encoder Linear, torch.topk, scatter into a dense [N, F] code, decoder Linear,
  autograd, torch Adam); speedup = reference / ours.
* floor: the bare encoder GEMM x W_enc^T at the same N, the work no TopK SAE step can skip, by the faster of
  torch's matmul and the step's own GEMM path (ops' linear in row chunks; `floor_paths_s` gives both);
  `floor_ratio` = ours / floor (1.0 would be perfect).
* sparsify: EleutherAI sparsify's SparseCoder (TopK, expansion 8, k 32) step on the same batch: its forward
  (fvu loss), backward, its decoder-gradient projection, torch Adam, its renormalisation.
* dictionary_learning / sae_lens: not installed here (their dependencies would replace torch or add ~40
  packages); their rows say so (NOT_INSTALLED).

Timing: all of the above and the step's pieces (`breakdown_s`: encode GEMM, top-k selection, decode, the
decoder's and the encoder's backward, the decoder-gradient projection, Adam, the decoder-norm projection, and
the rest) run in rounds, each once per round in turn; minima are reported, with the machine's load averages.
On the CPU a second pass (`one_thread_cpu_time`) times ours, the floor, the pieces and sparsify on one torch
thread by this process's CPU clock, which the other processes of a shared machine do not inflate.

Peak memory: one step at N=32,768 for ours and for the dense reference, each in a fresh process
(`peak_rss_of`), reported as bytes and as the ratio ours / reference (goal: <= 1/3), and as `memory_ratio_net`
after removing the constant both pay for importing torch's optimizer machinery (`optimizer_import_bytes`).

What should move, and by how much (d=640, F=5120, k=32, N=4096): the encoder GEMM is 2NdF = 26.8 GFLOP. The
dense step does five such GEMMs (encoder forward, decoder forward, decoder backward for dz and dW_dec, encoder
backward for dW_enc) plus topk and [N, F] scatters, i.e. >= 5x the floor. Ours does one GEMM (chunked, fused
with the top-k selection) and sparse work of 2Nkd = 168 MFLOP per kernel (decode, its two gradients, the
encoder gradient), plus Adam over 2 x 3.3M parameters (fused, one pass) and two O(F d) passes for the decoder
constraint: expect ~1.3x the floor, so ~3.5-4x faster than dense. Memory: dense holds several [N, F] fp32
matrices (671 MB each at N=32,768); ours holds [N, k] codes and one chunk of pre-activations.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import torch

from sae_fast import ops
from sae_fast.benchmarks.common import device_name, machine_load, peak_rss_of, record, time_interleaved

# Peers we tried to install (pip install --dry-run, Nov 2026) and did not, to keep the environment intact.
NOT_INSTALLED = {
    "sae_lens": "not installed: `pip install sae-lens` (6.54) pulls ~40 packages into the environment "
                "(transformer-lens, wandb, opentelemetry, nltk, plotly, ...)",
    "dictionary_learning": "not installed: `pip install dictionary-learning` (0.1.0) would replace torch "
                           "with "
                           "torch 2.14.1 + CUDA 13 wheels (several GB) and add nnsight, diffusers, wandb",
}


def _sizes(quick: bool) -> dict:
    if quick:
        return {"d": 64, "F": 512, "k": 8, "N": 512, "N_mem": 2048}
    return {"d": 640, "F": 5120, "k": 32, "N": 4096, "N_mem": 32768}


class DenseTopK(torch.nn.Module):
    """The plain-PyTorch TopK SAE a user would write: everything dense."""

    def __init__(self, d: int, F: int, k: int):
        super().__init__()
        self.k = k
        self.encoder = torch.nn.Linear(d, F)
        self.decoder = torch.nn.Linear(F, d)
        with torch.no_grad():
            W = torch.nn.functional.normalize(torch.randn(F, d), dim=1)
            self.decoder.weight.copy_(W.T)
            self.encoder.weight.copy_(W)
            self.encoder.bias.zero_()
            self.decoder.bias.zero_()

    def step(self, opt, x):
        pre = self.encoder(x - self.decoder.bias)
        v, i = pre.topk(self.k, dim=1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, i, v.relu())
        loss = (self.decoder(z) - x).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W, g = self.decoder.weight, self.decoder.weight.grad  # columns are the features here
            g.sub_((g * W).sum(0, keepdim=True) * W)
        opt.step()
        with torch.no_grad():
            W.div_(W.norm(dim=0, keepdim=True))


def _ours(s, device):
    """(sae, optimizer, step function) of our TopK SAE."""
    from sae_fast import TopKSAE
    from sae_fast.sae.train import make_optimizer, train_step

    sae = TopKSAE(s["d"], s["F"], s["k"]).to(device)
    opt = make_optimizer(sae, 1e-3)
    return sae, opt, lambda x: train_step(sae, opt, x)


def _dense(s, device):
    ref = DenseTopK(s["d"], s["F"], s["k"]).to(device)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    return lambda x: ref.step(opt, x)


def _sparsify(s, device):
    import sparsify.sparse_coder
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import eager_decode

    if device == "cpu":  # its Triton decoder needs a GPU; on the CPU sparsify's own fallback is embedding_bag
        sparsify.sparse_coder.decoder_impl = eager_decode
    sae = SparseCoder(s["d"], SparseCoderConfig(expansion_factor=s["F"] // s["d"], k=s["k"]), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)

    def step(x):
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


_MEM_CODE = {
    "ours": "from sae_fast.benchmarks.train import _ours\nstep = _ours({s!r}, 'cpu')[2]\n",
    "reference": "from sae_fast.benchmarks.train import _dense\nstep = _dense({s!r}, 'cpu')\n",
}


def _peak(which: str, s: dict) -> int:
    code = (_MEM_CODE[which].format(s=s) + f"torch.manual_seed(0)\nx = torch.randn({s['N_mem']}, {s['d']})\n"
            "step(x)\n")
    return peak_rss_of(code)


def _pieces(sae, opt, x) -> dict:
    """Our step cut into its pieces, each callable on its own with the step's tensors and kernels (TopK on the
    active backend): encoder GEMM (row chunks, as the step runs it), top-k selection on those chunks, decode
    (with the residual and the values' gradient dots, ops.sparse_mse's forward), the decoder's backward
    (segmented reduction), the encoder's backward (segmented
    reduction), the decoder-gradient projection, Adam, the decoder-norm projection. What the step does besides
    (loss, ReLU gate, b_pre's encoder term, input checks, dead-latent clocks) is the step minus their sum."""
    kern = ops._kernels(x, sae.cfg.backend)
    k, F = sae.cfg.k, sae.cfg.n_features
    with torch.no_grad():
        W, b, W_dec = sae.W_enc.detach(), sae._b_eff().detach(), sae.W_dec.detach()
        rows = ops._chunk_rows(F)
        chunks = [x[i:i + rows] for i in range(0, x.shape[0], rows)]
        pres = [kern.linear(c, W, b) for c in chunks]
        idx, vals = sae.encode(x)
        b_pre = sae.b_pre.detach()
        g, g_vals = torch.randn_like(x), torch.randn_like(vals)
    return {
        "encode_gemm": lambda: [kern.linear(c, W, b) for c in chunks],
        "topk_select": lambda: [kern.select_topk(p, k) for p in pres],
        "decode": lambda: kern.decode_residual(idx, vals, W_dec, b_pre, x),
        "decode_backward": lambda: kern.segment_reduce(kern.reverse_index(idx, F), vals, g, F),
        "encode_backward": lambda: kern.segment_reduce(kern.reverse_index(idx, F), g_vals, x, F, with_sum=True),
        "decoder_grad_projection": sae.remove_parallel_grad,
        "adam": opt.step,
        "decoder_norm": sae.normalize_decoder,
    }


def _gemm_path(kern) -> str:
    """Which product the step's encoder runs on this machine (see ops.CppKernels)."""
    if kern.name != "cpp":
        return kern.name
    return "oneDNN linear (AVX-512 CPU)" if kern.use_onednn else "BLAS addmm (no AVX-512)"


def _summary(times: dict) -> tuple[dict, list]:
    """(minimum of each contender, the per-round ratios ours / floor); the floor of a round is the faster of
    its two GEMM paths."""
    times = times | {"floor": [min(a, b) for a, b in zip(times["floor matmul"], times["floor ops.linear"])]}
    return {n: min(t) for n, t in times.items()}, [o / f for o, f in zip(times["ours"], times["floor"])]


def run(quick: bool = False) -> list[dict]:
    s = _sizes(quick)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_name = device_name(device)
    torch.manual_seed(0)
    x = torch.randn(s["N"], s["d"], device=device)
    cfg = {k: s[k] for k in ("d", "F", "k", "N")} | {"dtype": "float32"}

    sae, opt, ours = _ours(s, device)
    W = torch.randn(s["F"], s["d"], device=device)
    b0 = torch.zeros(s["F"], device=device)
    kern = ops._kernels(x, sae.cfg.backend)
    rows = ops._chunk_rows(s["F"])
    # The floor is the faster of torch's matmul and the GEMM path the step itself uses (on the CPU, in row
    # chunks: oneDNN on AVX-512 CPUs, BLAS elsewhere; `gemm_path` says which), so a faster BLAS lowers the floor
    # as much as the step.
    steps = {"ours": lambda: ours(x), "floor matmul": lambda: x @ W.T,
             "floor ops.linear": lambda: [kern.linear(x[i:i + rows], W, b0) for i in range(0, s["N"], rows)]}
    pieces = _pieces(sae, opt, x)
    steps |= {f"piece {name}": fn for name, fn in pieces.items()}
    dense = _dense(s, device)
    steps["reference"] = lambda: dense(x)
    has_sparsify = importlib.util.find_spec("sparsify") is not None
    if has_sparsify:
        sparsify_step = _sparsify(s, device)
        steps["sparsify"] = lambda: sparsify_step(x)
    timing = ("minimum over rounds; every round runs each contender once, in turn (a shared machine's load hits "
              "all alike)")
    load_before = machine_load()
    times = time_interleaved(steps, repeat=3 if quick else 25)
    load = {"before": load_before, "after": machine_load()}
    best, per_round = _summary(times)
    breakdown = {name: best[f"piece {name}"] for name in pieces}
    breakdown["rest (loss, gate, b_pre term, checks, dead-latent clocks)"] = best["ours"] - sum(breakdown.values())
    extra = {}
    if device == "cpu":  # the same without the other processes' CPU time: one thread, this process's CPU clock
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            solo = {n: fn for n, fn in steps.items() if n != "reference"}
            cpu_times = time_interleaved(solo, repeat=3 if quick else 15, clock=time.process_time)
        finally:
            torch.set_num_threads(threads)
        cpu_best, cpu_round = _summary(cpu_times)
        cpu_pieces = {name: cpu_best[f"piece {name}"] for name in pieces}
        extra["one_thread_cpu_time"] = {
            "ours_s": cpu_best["ours"], "floor_s": cpu_best["floor"],
            "floor_paths_s": {n: cpu_best[f"floor {n}"] for n in ("matmul", "ops.linear")},
            "floor_ratio": cpu_best["ours"] / cpu_best["floor"],
            "floor_ratio_median": statistics.median(cpu_round), "sparsify_s": cpu_best.get("sparsify"),
            "breakdown_s": cpu_pieces | {"rest": cpu_best["ours"] - sum(cpu_pieces.values())},
            "timing": "torch.set_num_threads(1), time.process_time (this process's CPU time), minimum over rounds"}
    rows = [record("train", cfg, dev_name, best["ours"], best["reference"], reference="dense PyTorch TopK step",
                   floor_s=best["floor"], floor_ratio=best["ours"] / best["floor"],
                   floor_paths_s={n: best[f"floor {n}"] for n in ("matmul", "ops.linear")},
                   floor_ratio_median=statistics.median(per_round),
                   median_s={n: statistics.median(times[n])
                             for n in ("ours", "floor matmul", "floor ops.linear", "reference")},
                   breakdown_s=breakdown,
                   breakdown_over_floor={n: t / best["floor"] for n, t in breakdown.items()},
                   rounds=len(times["ours"]), timing=timing, load=load, gemm_path=_gemm_path(kern), **extra)]

    for name, why in NOT_INSTALLED.items():
        rows.append(record("train", cfg | {"peer": name}, dev_name, best["ours"], None, reference=name,
                           skipped=why))
    if has_sparsify:
        rows.append(record("train", cfg | {"peer": "sparsify"}, dev_name, best["ours"], best["sparsify"],
                           reference="sparsify", decoder="triton" if device == "cuda" else "eager (embedding_bag)",
                           timing=timing, load=load, **({"one_thread_cpu_time": {
                               k: extra["one_thread_cpu_time"][k] for k in ("ours_s", "sparsify_s")}}
                               if extra else {})))
    else:
        rows.append(record("train", cfg | {"peer": "sparsify"}, dev_name, best["ours"], None, reference="sparsify",
                           skipped="eai-sparsify is not installed (pip install eai-sparsify)"))

    if device == "cpu":
        mem_ours, mem_ref = _peak("ours", s), _peak("reference", s)
        # Both pay torch's one-off cost of creating any torch.optim optimizer (it imports torch._dynamo,
        # ~140 MB of modules); the net ratio leaves that shared constant out.
        fixed = peak_rss_of("torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])")
        rows.append(record("train-mem", cfg | {"N": s["N_mem"]}, dev_name, None, None,
                           reference="dense PyTorch TopK step", unit="bytes (peak RSS of one step, fresh process)",
                           ours_bytes=mem_ours, reference_bytes=mem_ref,
                           memory_ratio=mem_ours / mem_ref if mem_ref else None, optimizer_import_bytes=fixed,
                           memory_ratio_net=(mem_ours - fixed) / (mem_ref - fixed) if mem_ref > fixed else None))
    return rows
