"""`sae-fast bench forward`: AIDO.Cell forward throughput and peak memory against the context length.

Ours = AIDOCell.forward, whose attention is torch's fused scaled_dot_product_attention (no T x T matrix).
Reference = the same model with a naive attention that materialises the [B, heads, T, T] scores, run only
where they fit: at AIDO.Cell's 19,266 tokens with the 100M config (20 heads) one fp32 [1, 20, T, T] matrix is
29.7 GB, and the naive attention holds two at once (the scores and their scaled copy, then that copy and the
softmax), 59.4 GB (55.3 GiB) per layer. Both run batch 1 on the CPU, each
context in a fresh process, so that the peak resident memory (Linux VmHWM, reset after the weights are
built) is the forward's own. Random weights: speed and memory do not depend on them.

On CUDA the same contexts run in this process in bf16, with torch.cuda.max_memory_allocated as the peak (the
naive reference where its bf16 matrices take <= 8 GB).

Full: the 100M config at 1,024, 4,096 and 19,266 tokens (the last takes minutes on a laptop CPU).
--quick: the 3M config at 128 and 256 tokens.
Both also time the embedded `mini` model over the whole demo data set (360 cells x 1,026 tokens, prepare
included; --quick: 16 cells), which must take under a minute on a laptop CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys

from sae_fast.benchmarks.common import device_name, record

_PROG = r"""
import json, sys, time, torch
from pathlib import Path
from unittest import mock
from sae_fast.models import aido_cell
from sae_fast.models.base import CellBatch
from sae_fast.benchmarks.common import proc_status_bytes as rss
from sae_fast.benchmarks.forward import naive_attention

size, T, naive, repeat = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))

model = aido_cell.random_aido_cell(aido_cell.AIDO_CELL_CONFIGS[size], device="cpu", dtype=torch.float32)
values = torch.rand(1, T) * 5
batch = CellBatch({"values": values}, torch.zeros(1, T, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                  torch.ones(1, T, dtype=torch.bool), values)
base = rss("VmRSS")
Path("/proc/self/clear_refs").write_text("5")   # reset the peak (VmHWM) to the current RSS
patch = (mock.patch.object(aido_cell.F, "scaled_dot_product_attention", naive_attention) if naive
         else mock.MagicMock())
times = []
with patch, torch.inference_mode():
    for i in range(repeat + (repeat > 1)):  # one untimed warm-up call unless a single (long) run
        t0 = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - t0)
    times = times[1:] if repeat > 1 else times
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "peak_bytes": rss("VmHWM") - base}))
"""


def _measure(size: str, T: int, naive: bool, repeat: int, threads: int) -> dict:
    args = [size, str(T), str(int(naive)), str(repeat), str(threads)]
    out = subprocess.run([sys.executable, "-c", _PROG, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"forward bench ({size}, T={T}, naive={naive}): {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_cuda(size: str, T: int, naive: bool, repeat: int) -> dict:
    """The forward at batch 1 in bf16 on the GPU: median seconds and the peak allocated bytes of the forward."""
    import time
    from unittest import mock

    import torch

    from sae_fast.models import aido_cell
    from sae_fast.models.base import CellBatch

    model = aido_cell.random_aido_cell(aido_cell.AIDO_CELL_CONFIGS[size], device="cuda", dtype=torch.bfloat16)
    values = torch.rand(1, T) * 5
    batch = CellBatch({"values": values}, torch.zeros(1, T, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                      torch.ones(1, T, dtype=torch.bool), values).to("cuda")
    patch = mock.patch.object(aido_cell.F, "scaled_dot_product_attention", naive_attention) if naive else \
        mock.MagicMock()
    times = []
    with patch, torch.inference_mode():
        model(batch)  # warm-up (kernel selection)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base
    del model
    torch.cuda.empty_cache()
    return {"seconds": sorted(times)[len(times) // 2], "peak_bytes": peak}


def naive_attention(q, k, v):
    """The reference: softmax(q k^T / sqrt(d)) v with the [B, heads, T, T] scores in memory."""
    import torch

    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


def _mini_demo_seconds(naive: bool, cells: int | None = None) -> float:
    """One forward pass of `mini` over PBMC3K (its first `cells`; None = all), batches of 8, prepare included
    (in this process)."""
    import time
    from unittest import mock

    import torch

    from sae_fast import datasets, load_model
    from sae_fast.models import aido_cell

    model, adata = load_model("mini"), datasets.pbmc3k()
    adata = adata if cells is None else adata[:cells]
    attention = naive_attention if naive else aido_cell.F.scaled_dot_product_attention
    with mock.patch.object(aido_cell.F, "scaled_dot_product_attention", attention), torch.inference_mode():
        model(next(iter(model.prepare(adata[:8]))))  # warm-up
        t0 = time.perf_counter()
        for batch in model.prepare(adata, batch_size=8):
            model(batch)
        return time.perf_counter() - t0


def run(quick: bool = False) -> list[dict]:
    import torch

    from sae_fast.models.aido_cell import AIDO_CELL_CONFIGS

    size, contexts = ("3m", [128, 256]) if quick else ("100m", [1024, 4096, 19266])
    cfg = AIDO_CELL_CONFIGS[size]
    threads = torch.get_num_threads()
    cuda = torch.cuda.is_available()
    ref_limit = 8 * 2**30  # run the naive reference only if its score matrices fit in a few GB
    elem = 2 if cuda else 4
    rows = []
    for T in contexts:
        repeat = 3 if T <= 4096 or cuda else 1
        args = (size, T, False, repeat) if cuda else (size, T, False, repeat, threads)
        measure = _measure_cuda if cuda else _measure
        ours = measure(*args)
        score_bytes = 2 * cfg.num_attention_heads * T * T * elem  # two [1, heads, T, T] matrices alive at once
        ref = measure(*args[:2], True, *args[3:]) if score_bytes <= ref_limit else None
        rows.append(record(
            "forward", {"model": f"aido_cell_{size}", "context": T, "batch": 1,
                        "dtype": "bfloat16" if cuda else "float32"},
            device_name("cuda" if cuda else "cpu"), ours["seconds"], ref["seconds"] if ref else None,
            tokens_per_s=T / ours["seconds"], peak_mem_bytes=ours["peak_bytes"],
            peak_mem_bytes_per_token=ours["peak_bytes"] / T,
            reference="naive attention materialising [B, heads, T, T]" if ref else
                      f"naive attention not run: its T x T matrices need {score_bytes / 1e9:.1f} GB "
                      f"({score_bytes / 2**30:.1f} GiB)",
            reference_tokens_per_s=T / ref["seconds"] if ref else None,
            reference_peak_mem_bytes=ref["peak_bytes"] if ref else None))
    per_token = [r["peak_mem_bytes_per_token"] for r in rows]
    # Linear growth: bytes per token must not rise with the context (a T x T term would make it grow ~T-fold).
    linear = per_token[-1] <= 1.5 * min(per_token)
    for r in rows:
        r["peak_mem_linear_in_context"] = linear
    cells = 16 if quick else 360
    ours, ref = _mini_demo_seconds(False, cells), _mini_demo_seconds(True, cells)
    from sae_fast import load_model
    from sae_fast.models.aido_cell import N_DEPTH_TOKENS

    context = len(load_model("mini").genes) + N_DEPTH_TOKENS
    rows.append(record("forward", {"model": "mini", "data": "pbmc3k", "cells": cells, "context": context,
                                   "batch": 8}, device_name("cpu"), ours, ref, tokens_per_s=cells * context / ours,
                       reference="the same model with naive attention", under_one_minute=ours < 60))
    return rows
