"""`sae-fast bench forward`: AIDO.Cell forward throughput and peak memory against the context length.

Ours = AIDOCell.forward, whose attention is torch's fused scaled_dot_product_attention (no T x T matrix).
Reference = the same model with a naive attention that materialises the [B, heads, T, T] scores, run only
where they fit: at AIDO.Cell's 19,266 tokens with the 100M config (20 heads) one fp32 [1, 20, T, T] matrix is
29.7 GB, and the naive attention holds two at once (the scores and their scaled copy, then that copy and the
softmax), 59.4 GB (55.3 GiB) per layer. Both run batch 1 on the CPU, each
context in a fresh process, so that the peak resident memory (Linux VmHWM, reset after the weights are
built) is the forward's own. Random weights: speed and memory do not depend on them.

Full: the 100M config at 1,024, 4,096 and 19,266 tokens (the last takes minutes on a laptop CPU).
--quick: the 3M config at 256, 1,024 and 2,048 tokens.
Both also time the embedded `mini` model over the whole demo data set (360 cells x 1,026 tokens, prepare
included), which must take under a minute on a laptop CPU.
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


def naive_attention(q, k, v):
    """The reference: softmax(q k^T / sqrt(d)) v with the [B, heads, T, T] scores in memory."""
    import torch

    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


def _mini_demo_seconds(naive: bool) -> float:
    """One forward pass of `mini` over all of pbmc_demo, batches of 8, prepare included (in this process)."""
    import time
    from unittest import mock

    import torch

    from sae_fast import datasets, load_model
    from sae_fast.models import aido_cell

    model, adata = load_model("mini"), datasets.pbmc_demo()
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

    size, contexts = ("3m", [256, 1024, 2048]) if quick else ("100m", [1024, 4096, 19266])
    cfg = AIDO_CELL_CONFIGS[size]
    threads = torch.get_num_threads()
    ref_limit = 8 * 2**30  # run the naive reference only if its score matrices fit in a few GB
    rows = []
    for T in contexts:
        repeat = 3 if T <= 4096 else 1
        ours = _measure(size, T, False, repeat, threads)
        score_bytes = 2 * cfg.num_attention_heads * T * T * 4  # two fp32 [1, heads, T, T] matrices alive at once
        ref = _measure(size, T, True, repeat, threads) if score_bytes <= ref_limit else None
        rows.append(record(
            "forward", {"model": f"aido_cell_{size}", "context": T, "batch": 1, "dtype": "float32"},
            device_name("cpu"), ours["seconds"], ref["seconds"] if ref else None,
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
    ours, ref = _mini_demo_seconds(False), _mini_demo_seconds(True)
    rows.append(record("forward", {"model": "mini", "data": "pbmc_demo", "cells": 360, "context": 1026,
                                   "batch": 8}, device_name("cpu"), ours, ref, tokens_per_s=360 * 1026 / ours,
                       reference="the same model with naive attention", under_one_minute=ours < 60))
    return rows
